"""Fit the per-layer state activations need from data before a run: CATS's thresholds (per layer, the |SiLU(gate)|
quantile that zeroes `target_sparsity` of the values) and output_aware's score scales (per neuron ||W_down[:, i]||,
times mean|up_i| over the calibration tokens for its gate score)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsetune.activations.cats import CATS
from sparsetune.activations.output_aware import OutputAware
from sparsetune.activations.silu import SiLU
from sparsetune.surgery.sparse_mlp import measuring_pass, sparse_mlps
from sparsetune.surgery.structure import readable_weight

# Values kept per layer per batch: enough for a quantile accurate to ~0.1%, small enough for 7B layers.
SAMPLE_PER_BATCH = 1 << 17


def quantile_threshold(values: torch.Tensor, target: float, floor: float | None = None) -> float:
    """The one quantile rule of every threshold calibration: the threshold below which `target` of `values` lie
    (the (k+1)-th smallest value, k = round(target * n), so exactly k values fall below it when they are distinct),
    at least `floor`. A rule keeping `value >= threshold` then zeroes k of n."""
    flat = values.reshape(-1).float()
    k = min(max(0, round(target * flat.numel())), flat.numel())
    if k == flat.numel():
        top = flat.max()
        t = float(torch.nextafter(top, top.new_tensor(float("inf"))))
    else:
        t = float(flat.kthvalue(k + 1).values)
    return t if floor is None else max(t, floor)


def needs_calibration(model) -> bool:
    """Some activation's per-layer state is still to be fitted on data (CATS before calibration)."""
    return any(m.activation.uncalibrated() for m in sparse_mlps(model))


class _Collector:
    """A sink that samples each layer's |SiLU(gate)| over the real tokens of the current batch and, for the layers
    in `up_layers`, sums |up| per neuron."""

    def __init__(self, seed: int, up_layers: dict):
        self.samples: dict[int, list[torch.Tensor]] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.mask: torch.Tensor | None = None
        self.up_layers = up_layers  # layer -> its SparseMLP (whose mean |up| is measured)
        self.up_sums: dict[int, torch.Tensor] = {}
        self.up_tokens: dict[int, int] = {}

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate: torch.Tensor) -> None:
        if layer in self.up_layers:
            x = mlp_input[self.mask.bool()] if self.mask is not None else mlp_input.reshape(-1, mlp_input.shape[-1])
            up = self.up_layers[layer].projections()[1](x).detach().float().abs()
            self.up_sums[layer] = self.up_sums.get(layer, 0) + up.sum(0).cpu()
            self.up_tokens[layer] = self.up_tokens.get(layer, 0) + up.shape[0]
        values = F.silu(gate.detach()).abs()
        flat = values[self.mask.bool()] if self.mask is not None else values.reshape(-1, values.shape[-1])
        flat = flat.reshape(-1).float().cpu()
        if flat.numel() > SAMPLE_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (SAMPLE_PER_BATCH,), generator=self.generator)]
        self.samples.setdefault(layer, []).append(flat)


def calibration_batches(model) -> int:
    """How many training micro-batches the model's uncalibrated activations are fitted on."""
    return max(m.activation.calibration_batches for m in sparse_mlps(model) if m.activation.uncalibrated())


@torch.no_grad()
def calibrate(model, batches: Iterable[dict], device, total: int | None = None, seed: int = 0,
              progress: bool = True, report=None) -> list[float]:
    """Set (and return) each CATS layer's threshold so that its target fraction of |SiLU(gate)| over the
    real tokens of `batches` falls below it, and each output_aware layer's score scales. Identical on every rank
    given identical batches. `report`: a function printing the one-line summary."""
    mlps = [m for m in sparse_mlps(model) if isinstance(m.activation, CATS)]
    scored = [m for m in sparse_mlps(model) if isinstance(m.activation, OutputAware) and m.activation.uncalibrated()]
    collector = _Collector(seed, {m.layer_idx: m for m in scored if m.activation.score_kind == "gate"})
    what = "CATS thresholds" if mlps else "output-aware score scales"
    used = [0]  # the batches there were: fewer than `total` when the training data is short

    def counted(items):
        for item in items:
            used[0] += 1
            yield item

    measuring_pass(model, counted(batches), device, collector, activation=SiLU(),  # dense SiLU while measuring
                   progress=lambda b: tqdm(b, total=total, desc=f"calibrating {what}", unit="batch",
                                           disable=not progress))
    on = f"{used[0]} training micro-batches" + (f" (all there are; {total} were asked for)" if total and used[0] < total
                                                  else "")
    for m in scored:
        weight = readable_weight(m.projections()[2])
        if weight is None:
            from sparsetune.errors import SparsetuneError

            raise SparsetuneError("relufy.activation=output_aware measures ||W_down[:, i]|| before the engine shards "
                                  "the model; this model's down_proj is already sharded")
        scales = weight.detach().float().norm(dim=0).cpu()
        if m.layer_idx in collector.up_sums:
            scales = scales * collector.up_sums[m.layer_idx] / max(1, collector.up_tokens[m.layer_idx])
        m.activation.scales = scales.tolist()
    if report is not None and scored:
        report(f"output_aware: measured the {scored[0].activation.score_kind} score's per-neuron scales of "
               f"{len(scored)} layers on {on}")
    thresholds = []
    for m in mlps:
        m.activation.threshold = quantile_threshold(torch.cat(collector.samples[m.layer_idx]),
                                                    m.activation.target_sparsity)
        thresholds.append(m.activation.threshold)
    if report is not None and thresholds:
        report(f"cats: calibrated {len(thresholds)} layer thresholds to {mlps[0].activation.target_sparsity:.0%} "
               f"sparsity on {on} (range {min(thresholds):.4g}.."
               f"{max(thresholds):.4g})")
    return thresholds
