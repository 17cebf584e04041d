"""The neuron predictors as PowerInfer computes them: per layer idx = fc2 @ relu(fc1 @ ffn_inp), a neuron skipped
when idx < one global `sparse_threshold` (PowerInfer d3ebd7c, llama.cpp:4688-4692, ggml.c:14256), with `ffn_inp` the
residual stream before the post-attention norm (llama.cpp:5045).

sparsetune's neuron predictors are `Linear(d -> r) [-> act] -> Linear(r -> m)` on `predictor.input`. They map
exactly when:
  - the output layer has no bias (`predictor.output_bias: false`): fc1/fc2 have none;
  - act is relu (as is) or none: a linear map z is written as relu(z) - relu(-z), i.e. fc1 = [W1; -W1] and
    fc2 = [W2, -W2] (twice the rank, the same outputs);
  - the input is PowerInfer's: `predictor.input: residual` reads the same residual stream. Predictors of the
    MLP input x = w * r / rms(r) fold exactly only at logit threshold 0: relu is positively homogeneous, so
    f(x) = f(w * r) / rms(r) has the sign of f(w * r), and fc1 = W1 diag(w) keeps exactly the same neurons. Any other
    threshold (a calibrated one) would be scaled by each token's rms, so it is refused;
  - one threshold serves every layer: a calibrated per-layer threshold t_l of one sign is folded into the layer's
    fc2 by scaling it with T / t_l (T = +-1), so `output >= T` keeps exactly what `logit >= t_l` kept;
  - no lookahead (PowerInfer feeds layer n's own residual to predictor n).
Anything else is refused with one line rather than exported approximately.
"""

from __future__ import annotations

import torch

from sparsetune.errors import SparsetuneError
from sparsetune.predictors.bank import PredictorBank


def _check(bank: PredictorBank) -> None:
    cfg = bank.cfg
    if cfg.lookahead:
        raise SparsetuneError("--powerinfer: lookahead predictors (predictor.lookahead=true) do not fit PowerInfer, "
                              "which feeds layer n's own residual stream to predictor n")
    if cfg.output_bias:
        raise SparsetuneError("--powerinfer: these predictors have an output bias, which PowerInfer's bias-free "
                              "fc1 -> ReLU -> fc2 cannot hold; train them with predictor.output_bias=false")
    if cfg.nonlinearity not in ("relu", "none"):
        raise SparsetuneError(f"--powerinfer: predictor.nonlinearity={cfg.nonlinearity} cannot be written as "
                              "fc1 -> ReLU -> fc2; use relu or none")
    if cfg.input != "residual":
        thresholds = bank.layer_thresholds or [bank.logit_threshold]
        if any(t != 0 for t in thresholds):
            raise SparsetuneError(
                "--powerinfer: these predictors read the MLP input after the post-attention norm, but PowerInfer "
                "feeds them the residual stream before it; with their calibrated thresholds (not 0) every token's "
                "norm would change which neurons are kept; train them with predictor.input=residual")


ZERO_NUDGE = 1e-4  # logit: what a layer's threshold of exactly 0 becomes beside negative ones


def global_threshold(bank: PredictorBank) -> tuple[float, list[float]]:
    """(PowerInfer's sparse_threshold T, per-layer output scale s_l) with s_l * logit >= T <=> logit >= t_l."""
    if bank.layer_thresholds is None:
        return bank.logit_threshold, [1.0] * bank.num_neuron_predictors
    ts = list(bank.layer_thresholds)
    if all(t <= 0 for t in ts) and any(t < 0 for t in ts) and any(t == 0 for t in ts):
        # a layer calibrated at the trained decision threshold (logit 0) beside negative ones: one global threshold
        # cannot scale 0, so it keeps the logits in [-ZERO_NUDGE, 0) too (a few more neurons, never fewer)
        ts = [-ZERO_NUDGE if t == 0 else t for t in ts]
    if all(t < 0 for t in ts) or all(t > 0 for t in ts):
        target = -1.0 if ts[0] < 0 else 1.0
        return target, [target / t for t in ts]
    raise SparsetuneError("--powerinfer: the calibrated per-layer thresholds have mixed signs (or are 0), which one "
                          "global sparse_threshold cannot express; recalibrate or export without --powerinfer")


def powerinfer_layers(bank: PredictorBank, norm_weights: list[torch.Tensor] | None = None
                      ) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """(sparse_threshold, per-layer {'fc1.weight', 'fc2.weight'}) reproducing the bank's neuron masks on the
    residual stream. `norm_weights`: each layer's post-attention norm weight (needed for mlp_input predictors)."""
    _check(bank)
    threshold, scales = global_threshold(bank)
    layers = []
    for idx, (predictor, scale) in enumerate(zip(bank.neurons, scales)):
        w1 = predictor.down.weight.detach().float().cpu()
        if bank.cfg.input != "residual":
            if norm_weights is None:
                raise ValueError("mlp_input predictors need the layers' post-attention norm weights")
            w1 = w1 * norm_weights[idx].detach().float().cpu()[None, :]
        w2 = predictor.up.weight.detach().float().cpu() * scale
        if bank.cfg.nonlinearity == "none":
            w1, w2 = torch.cat([w1, -w1]), torch.cat([w2, -w2], dim=1)
        layers.append({"fc1.weight": w1.contiguous(), "fc2.weight": w2.contiguous()})
    return threshold, layers


def engine_mask(fc1: torch.Tensor, fc2: torch.Tensor, threshold: float, residual: torch.Tensor) -> torch.Tensor:
    """The neurons PowerInfer computes for residual-stream rows, the way its graph does: fc2 relu(fc1 r) >= T
    (llama.cpp:4688-4692). With F16 weights (as the GGUF stores them by default) ggml's CPU mul_mat first rounds its
    F32 input to F16, the weight's vec_dot type (ggml.c:430-439, 9703-9715), and sums the products in F32: so does
    this, for the residual before fc1 and the hidden ReLU output before fc2."""
    x = residual.float()
    if fc1.dtype == torch.float16:
        x = x.half().float()
    hidden = torch.relu(x @ fc1.float().t())
    if fc2.dtype == torch.float16:
        hidden = hidden.half().float()
    return hidden @ fc2.float().t() >= threshold


def f16_margin(fc1: torch.Tensor, fc2: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """A bound on how far F16 storage of fc1/fc2 and ggml's F16 rounding of their inputs can move a predictor output
    (first order: four roundings of 2^-11 each along |fc2| |fc1| |r|, plus F32 sums): a neuron whose F32 output is
    further than this from the threshold is kept or skipped alike by PowerInfer's F16 predictors."""
    u = 2.0 ** -11
    return 5 * u * ((residual.float().abs() @ fc1.float().abs().t()) @ fc2.float().abs().t()) + 1e-6


def hot_first_order(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the neurons by descending activation count (a stable sort: equal counts keep their index order),
    as int64 permutations of range(n_ff): file row r of the exported GGUF holds the model's neuron order[r].
    Permuting a layer's MLP neurons (rows of gate/up, columns of down, rows of the predictor's fc2) is an exact
    identity of the model's function; hot-first clusters the neurons that fire for a token towards the front rows,
    which PowerInfer's CPU sparse kernels run faster than scattered rows."""
    return [torch.sort(c.detach().cpu().reshape(-1), descending=True, stable=True).indices.to(torch.int64)
            for c in counts]


class _Counter:
    """A SparseMLP sink counting, per layer, the tokens on which each neuron is active (a != 0)."""

    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate=None) -> None:
        active = (activation.detach() != 0).reshape(-1, activation.shape[-1]).sum(0).cpu()
        self.counts[layer] = self.counts.get(layer, torch.zeros_like(active)) + active


@torch.no_grad()
def neuron_activation_counts(model, batches, device) -> tuple[list[torch.Tensor], int]:
    """(per layer, how many calibration tokens activate each neuron; the number of tokens): what PowerInfer's
    GPU/CPU split solver reads."""
    from sparsetune.surgery.sparse_mlp import patched_mlps

    counter, tokens = _Counter(), 0
    with patched_mlps(model, sink=counter):
        for batch in batches:
            model(input_ids=batch["input_ids"].to(device))
            tokens += batch["input_ids"].numel()
    return [counter.counts[i] for i in sorted(counter.counts)], tokens
