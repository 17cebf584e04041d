"""Batch-1 (decode) MLP kernels that read only the active neurons' weights.

For one token x and the active neuron indices idx of a gated MLP with weights W_gate, W_up [m, d] and
W_down^T [m, d] (rows = neurons, so each neuron's three weight vectors are contiguous rows):

    a_i = act(W_gate[i] . x) * (W_up[i] . x)        for i in idx
    y   = sum_i a_i * W_down^T[i]

Memory traffic is 3 * len(idx) * d values instead of 3 * m * d: at sparsity s the ideal speedup of this
memory-bound step is 1/(1-s). Two implementations:

  fused   a C++/OpenMP kernel compiled on first use (torch.utils.cpp_extension): one pass over the active rows,
          no copies (CPU, float32 weights).
  gather  plain torch: index_select of the gate/up rows, matvec, and embedding_bag (a weighted row sum without
          copying) for the down projection. Works on any device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sparsetune.surgery.activations import MLPActivation

_CPP = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

// act: 0 relu, 1 silu, 2 drelu (relu on gate and up), 3 relu2
torch::Tensor sparse_mlp_decode(torch::Tensor x, torch::Tensor w_gate, torch::Tensor w_up, torch::Tensor w_down_t,
                                torch::Tensor idx, int64_t act) {
  TORCH_CHECK(x.dim() == 1 && w_gate.is_contiguous() && w_up.is_contiguous() && w_down_t.is_contiguous());
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w_gate.scalar_type() == torch::kFloat);
  const int64_t d = x.size(0);
  const int64_t k = idx.size(0);
  const float* xp = x.data_ptr<float>();
  const float* gp = w_gate.data_ptr<float>();
  const float* up = w_up.data_ptr<float>();
  const float* dp = w_down_t.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  std::vector<float> partial((size_t)threads * d, 0.0f);
  #pragma omp parallel
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    float* acc = partial.data() + (size_t)t * d;
    #pragma omp for schedule(static)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = ip[j];
      const float* g = gp + i * d;
      const float* u = up + i * d;
      float sg = 0.f, su = 0.f;
      #pragma omp simd reduction(+:sg,su)
      for (int64_t c = 0; c < d; ++c) { sg += g[c] * xp[c]; su += u[c] * xp[c]; }
      float a;
      if (act == 0) a = (sg > 0.f ? sg : 0.f) * su;
      else if (act == 1) a = sg / (1.f + std::exp(-sg)) * su;
      else if (act == 2) a = (sg > 0.f ? sg : 0.f) * (su > 0.f ? su : 0.f);
      else a = (sg > 0.f ? sg * sg : 0.f) * su;
      if (a == 0.f) continue;
      const float* w = dp + i * d;
      #pragma omp simd
      for (int64_t c = 0; c < d; ++c) acc[c] += a * w[c];
    }
  }
  torch::Tensor out = torch::zeros({d}, x.options());
  float* op = out.data_ptr<float>();
  for (int t = 0; t < threads; ++t) {
    const float* acc = partial.data() + (size_t)t * d;
    for (int64_t c = 0; c < d; ++c) op[c] += acc[c];
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sparse_mlp_decode", &sparse_mlp_decode); }
"""

ACT_CODES = {"relu": 0, "silu": 1, "drelu": 2, "relu2": 3}  # others run in the gather kernel


@functools.lru_cache(maxsize=1)
def fused_module():
    """The compiled C++ kernel, or None when no compiler is available (the gather kernel is used then)."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(name="sparsetune_sparse_mlp", cpp_sources=_CPP, functions=None,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch kernel
        print(f"sparsetune: fused sparse MLP kernel unavailable ({type(exc).__name__}); using the gather kernel")
        return None


class DecodeWeights:
    """One MLP's weights laid out for the kernels: gate and up [m, d], down transposed to [m, d], and its
    elementwise activation (a sparsetune MLPActivation). The fused kernel implements relu, silu, drelu and relu2;
    other activations (fatrelu, cats, ...) run in the gather kernel."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: MLPActivation):
        self.w_gate = w_gate.detach().contiguous()
        self.w_up = w_up.detach().contiguous()
        self.w_down_t = w_down.detach().t().contiguous()
        self.act_fn = activation

    @torch.no_grad()
    def gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = torch.mv(self.w_gate.index_select(0, idx), x)
        u = torch.mv(self.w_up.index_select(0, idx), x)
        a = self.act_fn(g, u)
        return F.embedding_bag(idx.view(1, -1), self.w_down_t, per_sample_weights=a.view(1, -1), mode="sum")[0]

    @torch.no_grad()
    def fused(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        module = fused_module() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        code = ACT_CODES.get(self.act_fn.name)
        if module is None or code is None:
            return self.gather(x, idx)
        return module.sparse_mlp_decode(x, self.w_gate, self.w_up, self.w_down_t, idx, code)

    @torch.no_grad()
    def dense(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act_fn(F.linear(x, self.w_gate), F.linear(x, self.w_up))
        return F.linear(a, self.w_down_t.t())
