"""Per-layer exact-zero thresholds fitted on calibration tokens: top-k to exact zeros, and ProSparse's last step.

A converted layer drops neuron j when a value read from its gate alone is below the layer's threshold t, so an
engine decides from the gate which up / down rows to skip, with no sort:

  fatrelu  value = gate          a = gate * [gate >= t] * up   (ReLU-family runs; t >= 0, t = 0 is ReLU itself)
  cats     value = |SiLU(gate)|  a = SiLU(gate) * [|SiLU(gate)| >= t] * up   (SiLU-based runs: silu, topk, cats)
  output_aware  value = the activation's output-aware score (activations/output_aware.py; its `product` score
           reads up too, so an engine skips only down rows there)

Each form is an activation plugin (its `threshold_form`); this module asks it through the protocol
(`thresholded_from`, `rule_values`, `rule_reads`, `undropped`, `threshold_floor`, `with_threshold`).

Each layer's t is chosen on a sample of calibration tokens, for a target sparsity (the share of values below t) or
for a CETT budget: the highest t whose mean CETT (sparsity/cett.py) of dropping by this rule stays within the
budget. The reference output is the elementwise activation the rule thresholds (ReLU, SiLU): for a top-k model
that is its dense SiLU, the function top-k approximates. The calibration forwards run the model as it is (top-k
included), so every layer sees the inputs it sees in training.

The fitted thresholds are the model's activation from then on, so a checkpoint's activation state carries them
(checkpoint/activation_state.py); the conversion's record (what was fitted, the figures around it) is the `thresholds`
training component's own part (CONVERSION_FILE).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparsetune.activations import MLPActivation, activation_class, quantile_threshold
from sparsetune.errors import SparsetuneError
from sparsetune.sparsity.cett import CettLayer, readable_down_weight, threshold_for_cett
from sparsetune.surgery.sparse_mlp import measuring_pass, patched_mlps, sparse_mlps

CONVERSION_FILE = "thresholds.json"


def rule_values(kind: str, gate: torch.Tensor) -> torch.Tensor:
    """The per-neuron value a gate-only `kind` rule compares (float32): the gate (fatrelu), |SiLU(gate)| (cats)."""
    return activation_class(kind).thresholded_from(None).rule_values(gate, None)


def reference_activation(rule: MLPActivation) -> MLPActivation:
    """The elementwise activation a rule thresholds (its `undropped`: ReLU for fatrelu, SiLU for cats, output_aware's
    form)."""
    return activation_class(rule.undropped)()


def thresholded_activation(kind: str, threshold: float, sparsity: float = 0.5,
                           current: MLPActivation | None = None) -> MLPActivation:
    """One layer's converted activation: the `kind` rule (for a layer computing `current`) at `threshold`."""
    return activation_class(kind).thresholded_from(current).with_threshold(threshold, sparsity)


class _GateSampler:
    """A sink sampling token rows of each layer's rule values and, when asked, the reference activation
    (recomputed for the sampled rows only: up_proj on their inputs)."""

    def __init__(self, kind: str, tokens_per_layer: int, per_batch: int, with_activation: bool, seed: int):
        self.kind, self.limit, self.per_batch, self.with_activation = kind, tokens_per_layer, per_batch, with_activation
        self.generator = torch.Generator().manual_seed(seed)
        self.mlps: dict[int, object] = {}
        self.rules: dict[int, MLPActivation] = {}  # layer -> the `kind` rule for what the layer computes
        self.values: dict[int, list[torch.Tensor]] = {}
        self.activations: dict[int, list[torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate: torch.Tensor) -> None:
        have = sum(len(v) for v in self.values.get(layer, []))
        width = gate.shape[-1]
        rows_g = gate[self.mask.bool()] if self.mask is not None else gate.reshape(-1, width)
        rows_x = mlp_input[self.mask.bool()] if self.mask is not None else mlp_input.reshape(-1, mlp_input.shape[-1])
        take = min(self.limit - have, self.per_batch, rows_g.shape[0])
        if take <= 0:
            return
        idx = torch.randperm(rows_g.shape[0], generator=self.generator)[:take].to(rows_g.device)
        g = rows_g[idx]
        rule = self.rules.setdefault(layer, activation_class(self.kind).thresholded_from(self.mlps[layer].activation))
        reads_up = rule.rule_reads != "gate"
        up = self.mlps[layer].projections()[1](rows_x[idx]) if self.with_activation or reads_up else None
        self.values.setdefault(layer, []).append(rule.rule_values(g, up))
        if self.with_activation:
            self.activations.setdefault(layer, []).append(reference_activation(rule)(g, up).float())


@dataclass
class LayerFit:
    threshold: float
    sparsity: float  # share of the sampled values below the threshold
    cett: float | None  # mean CETT of the rule at the threshold (None with sharded weights)


@torch.no_grad()
def fit_thresholds(model, batches: Iterable[dict], device, kind: str, target_sparsity: float | None = None,
                   cett: float | None = None, tokens_per_layer: int = 2048, batches_count: int = 8,
                   seed: int = 0) -> list[LayerFit]:
    """Per-layer thresholds of the `kind` rule for `target_sparsity` or a `cett` budget, from tokens sampled evenly
    over `batches` (`batches_count` of them). The model computes as it is; nothing of it changes. Identical on every
    rank given identical batches."""
    if (target_sparsity is None) == (cett is None):
        raise ValueError("give exactly one of target_sparsity and cett")
    mlps = sparse_mlps(model)
    weights = [readable_down_weight(m) for m in mlps]
    with_activation = all(w is not None for w in weights)
    if cett is not None and not with_activation:
        raise SparsetuneError("thresholds.cett needs the MLP weights unsharded (not fsdp / zero3); use "
                              "thresholds.target_sparsity there")
    if isinstance(batches, list):  # fewer than asked when the training data is short: sample more from each
        batches_count = min(batches_count, len(batches))
    per_batch = max(1, math.ceil(tokens_per_layer / max(1, batches_count)))
    sampler = _GateSampler(kind, tokens_per_layer, per_batch, with_activation, seed)
    sampler.mlps = {m.layer_idx: m for m in mlps}
    with patched_mlps(model, override=None):  # the model as it computes, not a mask-aware override
        measuring_pass(model, batches, device, sampler)
    floor = activation_class(kind).threshold_floor  # fatrelu: a negative threshold would pass negative gates
    fits = []
    for m, w in zip(mlps, weights):
        values = torch.cat(sampler.values[m.layer_idx])
        a = torch.cat(sampler.activations[m.layer_idx]) if with_activation else None
        if cett is not None:
            t, err, sparsity = threshold_for_cett(a, w, cett, values=values, floor=floor, resolution=1e-4)
            fits.append(LayerFit(t, sparsity, err))
            continue
        t = quantile_threshold(values, target_sparsity, floor)
        err = CettLayer(a, w.float().to(a.device)).mean(values, torch.tensor(t)) if with_activation else None
        fits.append(LayerFit(t, float((values < t).float().mean()), err))
    return fits


def apply_thresholds(model, kind: str, thresholds: list[float], sparsities: list[float] | None = None) -> None:
    """Every SparseMLP of `model` computes the `kind` rule with its layer's threshold from now on."""
    mlps = sparse_mlps(model)
    if len(thresholds) != len(mlps):
        raise SparsetuneError(f"{len(thresholds)} fitted thresholds for a model with {len(mlps)} MLP layers")
    for i, m in enumerate(mlps):
        m.activation = thresholded_activation(kind, thresholds[i], sparsities[i] if sparsities else 0.5,
                                              m.activation)


@dataclass
class Conversion:
    """A run's conversion to per-layer thresholds: what was fitted, and the held-out figures around it."""

    step: int
    kind: str
    from_activation: str
    criterion: dict  # {"target_sparsity": x} or {"cett": x}
    calibration_batches: int
    tokens_per_layer: int
    thresholds: list[float]
    fit_sparsity_per_layer: list[float]
    fit_cett_per_layer: list[float] | None
    before: dict  # held-out {"perplexity", "loss", "sparsity", "per_layer"} just before ...
    after: dict  # ... and just after the conversion

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Conversion:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def apply(self, model) -> None:
        apply_thresholds(model, self.kind, self.thresholds, self.fit_sparsity_per_layer)

    def describe(self) -> str:
        (name, value), = self.criterion.items()
        b, a = self.before, self.after
        return (f"thresholds: step {self.step}: {self.from_activation} -> per-layer {self.kind} fitted to "
                f"{name.replace('_', ' ')} {value:g} on {self.calibration_batches} training micro-batches "
                f"(thresholds {min(self.thresholds):.4g}..{max(self.thresholds):.4g}); held-out sparsity "
                f"{b['sparsity']:.1%} -> {a['sparsity']:.1%}, perplexity {b['perplexity']:.3f} -> "
                f"{a['perplexity']:.3f}")


def read_conversion(folder: Path) -> tuple[Conversion | None, dict]:
    """(the conversion saved in a checkpoint folder or None, the rest of the saved state)."""
    path = Path(folder) / CONVERSION_FILE
    if not path.is_file():
        return None, {}
    state = json.loads(path.read_text())
    done = state.get("conversion")
    return (Conversion.from_json(done) if done else None), state

