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

Build cache. The fused kernel is compiled with -march=native for speed (the SIMD loops are the whole point). A
binary built that way runs only on CPUs with the same instruction set, and torch's default extension cache
(~/.cache/torch_extensions, $TORCH_EXTENSIONS_DIR) is keyed by source and flags only, so cluster nodes sharing a
home directory would load each other's binaries and die with SIGILL. The kernel is therefore built into
sparsetune's own cache, under a directory (and module name) keyed by a hash of this CPU's model and feature
flags (plus torch/Python versions and the compiler flags): a different CPU never loads another's binary. When
the CPU cannot be identified, the kernel is built without -march=native (portable, a little slower).

What ran is recorded: `kernel_in_use()` says whether the fused kernel was built (or why not: the exception type,
its first line and the compiler's first error line), with which flags and CPU key; every JSON that reports a
decode speed carries it. A failed build prints one line, not a traceback.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import sys

import torch
import torch.nn.functional as F

from sparsetune.activations import MLPActivation, activation_class, build_activation
from sparsetune.console import notice
from sparsetune.paths import cache_dir

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
  // Cheap O(1) guards against memory-unsafe calls; the O(k) bounds check of idx is done in Python
  // (check_decode_args) so that the hot loop below stays branch-free.
  TORCH_CHECK(w_gate.dim() == 2, "sparse_mlp_decode: w_gate must be 2-D [m, d]");
  TORCH_CHECK(w_up.sizes() == w_gate.sizes() && w_down_t.sizes() == w_gate.sizes(),
              "sparse_mlp_decode: w_up and w_down_t must have w_gate's shape [m, d]");
  TORCH_CHECK(x.dim() == 1 && x.size(0) == w_gate.size(1), "sparse_mlp_decode: x must be 1-D of length d");
  TORCH_CHECK(x.is_contiguous() && w_gate.is_contiguous() && w_up.is_contiguous() && w_down_t.is_contiguous(),
              "sparse_mlp_decode: x and weights must be contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w_gate.scalar_type() == torch::kFloat &&
              w_up.scalar_type() == torch::kFloat && w_down_t.scalar_type() == torch::kFloat,
              "sparse_mlp_decode: x and weights must be float32");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.dim() == 1 && idx.is_contiguous(),
              "sparse_mlp_decode: idx must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(x.device().is_cpu() && w_gate.device().is_cpu() && w_up.device().is_cpu() &&
              w_down_t.device().is_cpu() && idx.device().is_cpu(), "sparse_mlp_decode: CPU tensors only");
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

# The compile flags apart from the CPU-specific one, which build_flags() adds only for an identified CPU.
_BASE_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
# /proc/cpuinfo fields that pin down the instruction set: x86 ("vendor_id", "model name", "flags") and ARM
# ("CPU implementer", "CPU part", "Features"). The first processor's values are used.
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags", "CPU implementer", "CPU part", "Features")


def cpu_description(cpuinfo: str | None = None) -> str:
    """This CPU's identity for keying -march=native builds: the instruction-set fields of /proc/cpuinfo (or of
    `cpuinfo`, its text), one "field: value" per line; "" when none is found (then the build is portable)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux, or no procfs: platform's (weaker) answer, or nothing
            cpuinfo = ""
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in _CPU_FIELDS and key not in found:
            found[key] = " ".join(value.split())
    if found:
        return "\n".join(f"{k}: {found[k]}" for k in _CPU_FIELDS if k in found)
    # platform.processor() is "" or just the architecture on Linux, so it only counts on other systems, where
    # it names the CPU (e.g. macOS "arm", "i386" plus the machine).
    proc = platform.processor().strip()
    return f"processor: {proc}\nmachine: {platform.machine()}" if proc and proc != platform.machine() else ""


def build_flags(cpu: str) -> list[str]:
    """Compiler flags for a CPU description: -march=native only when the CPU is identified (the build key then
    names it); otherwise a portable build, since an unkeyed native binary could reach another CPU."""
    return _BASE_CFLAGS + (["-march=native"] if cpu else [])


def build_key(cpu: str, flags: list[str]) -> str:
    """Short hash naming the build: CPU description, compiler flags, the torch/Python ABI it links against and the
    kernel source (so two sparsetune versions sharing a cache do not rebuild over each other's binary)."""
    ident = "\n".join([cpu, " ".join(flags), torch.__version__, f"py{sys.version_info[0]}{sys.version_info[1]}",
                       hashlib.sha256(_CPP.encode()).hexdigest()])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _clip(line: str, limit: int) -> str:
    line = line.strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def failure_summary(exc: BaseException) -> str:
    """One line for a failed build: the exception type and first line, plus the compiler's first "error:" line
    when there is one (torch's first line is usually just the compile command, which does not say what failed)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    summary = f"{type(exc).__name__}: {_clip(lines[0], 160) if lines else ''}"
    error = next((line for line in lines[1:] if "error:" in line.lower()), None)
    return summary + (f" | {_clip(error, 200)}" if error else "")


def build_fused(cpuinfo: str | None = None, extra_cflags: list[str] | None = None, quiet: bool = False):
    """Compile (or load from sparsetune's cache) the fused kernel for this CPU. Never raises.

    Returns (module or None, record): record is {"kernel": "fused"|"gather", "reason", "build_flags", "cpu_key"}.
    `cpuinfo` (the text of /proc/cpuinfo) and `extra_cflags` are for tests and experiments; a build failure
    prints a one-line notice unless `quiet`."""
    cpu = cpu_description(cpuinfo)
    flags = build_flags(cpu) + list(extra_cflags or [])
    key = build_key(cpu, flags)
    record = {"kernel": "fused", "reason": "C++/OpenMP kernel built for this CPU", "build_flags": flags,
              "cpu_key": key}
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load_inline(name=f"sparsetune_sparse_mlp_{key}", cpp_sources=_CPP, functions=None,
                                           # copies: torch appends its own flags to these lists in place,
                                           # which would change the next load's hash and force a rebuild
                                           extra_cflags=list(flags), extra_ldflags=list(_LDFLAGS),
                                           build_directory=str(cache_dir("kernels", key)), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch kernel, and say why
        record.update(kernel="gather", reason=f"build failed: {failure_summary(exc)}")
        if not quiet:
            notice(f"fused sparse MLP kernel unavailable ({record['reason']}); using the gather kernel", err=True)
        return None, record
    return module, record


# The functions the fused kernel's `act` switch implements (the C++ above), by code. An activation runs there when
# its math is one of them (`MLPActivation.computes`), else in the gather kernel: the kernel knows what it computes,
# the activation knows nothing of kernels.
FUSED_FUNCTIONS = (
    (0, lambda gate, up: F.relu(gate) * up),
    (1, lambda gate, up: F.silu(gate) * up),
    (2, lambda gate, up: F.relu(gate) * F.relu(up)),
    (3, lambda gate, up: torch.square(F.relu(gate)) * up),
)


def fused_code(activation: MLPActivation | str | None) -> int | None:
    """The fused kernel's code for an elementwise activation (an instance, or a name at its recipe defaults), or
    None when the kernel does not compute it (an activation fitted on data computes no fixed function by name)."""
    if isinstance(activation, str):
        if activation_class(activation).needs_data:
            return None
        activation = build_activation({"activation": activation})
    if activation is None:
        return None
    return next((code for code, fn in FUSED_FUNCTIONS if activation.computes(fn)), None)


@functools.lru_cache(maxsize=1)
def _default_build():
    return build_fused()


def fused_module():
    """The compiled C++ kernel, or None when it could not be built (the gather kernel is used then)."""
    return _default_build()[0]


def kernel_in_use(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  activation: MLPActivation | str | None = None) -> dict:
    """Which kernel DecodeWeights.fused runs for weights and inputs on `device` of `dtype` with `activation`
    (None: one the fused kernel implements), and why: {"kernel": "fused"|"gather", "reason", "build_flags",
    "cpu_key"}. Builds the kernel on first call when it applies (as DecodeWeights.fused does, so no build on GPU
    runs: build_flags is then [] and cpu_key None). A JSON reporting a decode speed should carry this."""
    device = torch.device(device)
    why_not = None
    if device.type != "cpu":
        why_not = f"the fused kernel is CPU-only (device {device})"
    elif dtype != torch.float32:
        why_not = f"the fused kernel is float32-only (dtype {dtype})"
    elif activation is not None and fused_code(activation) is None:
        name = activation if isinstance(activation, str) else activation.name
        why_not = f"activation {name!r} has no fused implementation"
    if why_not is not None:
        return {"kernel": "gather", "reason": why_not, "build_flags": [], "cpu_key": None}
    record = _default_build()[1]
    return {**record, "build_flags": list(record["build_flags"])}  # a copy: callers may edit what they report


def _check_weights(w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> None:
    """Raise ValueError, one line naming the problem, unless the weights are safe for the fused kernel: float32
    contiguous CPU tensors of one shape [m, d] (checked once per layer by DecodeWeights: weights do not change)."""
    if w_gate.dim() != 2:
        raise ValueError(f"fused decode kernel: w_gate must be 2-D [m, d], got shape {tuple(w_gate.shape)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        if w.shape != w_gate.shape:
            raise ValueError(f"fused decode kernel: {name} must have w_gate's shape {tuple(w_gate.shape)}, "
                             f"got {tuple(w.shape)}")
        if w.dtype != torch.float32:
            raise ValueError(f"fused decode kernel: {name} must be float32, got {w.dtype}")
        if w.device.type != "cpu":
            raise ValueError(f"fused decode kernel: {name} must be on the CPU, got {w.device}")
        if not w.is_contiguous():
            raise ValueError(f"fused decode kernel: {name} must be contiguous (call .contiguous())")


def _check_inputs(x: torch.Tensor, idx: torch.Tensor, m: int, d: int) -> None:
    """The per-call checks: x float32 of shape [d], idx 1-D int64 in [0, m), both contiguous on the CPU."""
    if x.dim() != 1 or x.shape[0] != d:
        raise ValueError(f"fused decode kernel: x must be 1-D of length d={d}, got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"fused decode kernel: x must be float32, got {x.dtype}")
    if not x.is_cpu or not x.is_contiguous():  # (.is_cpu: a fraction of .device's cost on this per-token path)
        raise ValueError(f"fused decode kernel: x must be a contiguous CPU tensor (device {x.device})")
    if idx.dtype != torch.int64:
        raise ValueError(f"fused decode kernel: idx must be int64, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"fused decode kernel: idx must be 1-D, got shape {tuple(idx.shape)}")
    if not idx.is_cpu or not idx.is_contiguous():
        raise ValueError(f"fused decode kernel: idx must be a contiguous CPU tensor (device {idx.device})")
    if idx.numel():  # the C++ loop reads rows idx[j] unchecked: an out-of-range index would read stray memory
        lo_t, hi_t = torch.aminmax(idx)  # one pass over idx for both ends
        lo, hi = int(lo_t), int(hi_t)
        if lo < 0 or hi >= m:
            raise ValueError(f"fused decode kernel: idx values must lie in [0, {m}), got min {lo}, max {hi}")


class DecodeWeights:
    """One MLP's weights laid out for the kernels: gate and up [m, d], down transposed to [m, d], and its
    elementwise activation (a sparsetune MLPActivation). The fused kernel implements relu, silu, drelu and relu2;
    other activations (fatrelu, cats, ...), other devices and dtypes run in the gather kernel."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: MLPActivation):
        self.w_gate = w_gate.detach().contiguous()
        self.w_up = w_up.detach().contiguous()
        self.w_down_t = w_down.detach().t().contiguous()
        self.act_fn = activation
        self._code = fused_code(activation)  # its code in the kernel's switch, or None (the gather kernel)
        # The weights never change, so they are checked once here and only x and idx on every (hot) call.
        weights = (self.w_gate, self.w_up, self.w_down_t)
        self._fusable = self._code is not None and all(w.device.type == "cpu" and w.dtype == torch.float32
                                                       for w in weights)
        if self._fusable:
            _check_weights(self.w_gate, self.w_up, self.w_down_t)

    @torch.no_grad()
    def gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = torch.mv(self.w_gate.index_select(0, idx), x)
        u = torch.mv(self.w_up.index_select(0, idx), x)
        a = self.act_fn(g, u)
        return F.embedding_bag(idx.view(1, -1), self.w_down_t, per_sample_weights=a.view(1, -1), mode="sum")[0]

    @torch.no_grad()
    def fused(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The fused kernel when it applies (built, CPU float32 input and weights, an activation it implements),
        else the gather kernel. x and idx are checked (ValueError) before the fused kernel reads memory."""
        if not self._fusable or not x.is_cpu or x.dtype != torch.float32:
            return self.gather(x, idx)
        module = fused_module()
        if module is None:
            return self.gather(x, idx)
        x = x.contiguous()  # a no-op for decode's hidden states; a strided view would otherwise be rejected
        _check_inputs(x, idx, self.w_gate.shape[0], self.w_gate.shape[1])
        return module.sparse_mlp_decode(x, self.w_gate, self.w_up, self.w_down_t, idx, self._code)

    @torch.no_grad()
    def dense(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act_fn(F.linear(x, self.w_gate), F.linear(x, self.w_up))
        return F.linear(a, self.w_down_t.t())
