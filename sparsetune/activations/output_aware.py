"""output_aware: SwiGLU kept (SiLU(gate) * up, the model's own function), each layer zeroing the neurons whose
output-aware score is below its threshold: score `product` = |SiLU(gate) * up| * ||W_down[:, i]|| (WINA's and
CETT's score: what the neuron adds to the MLP output; an engine skips only the down row of a zero neuron unless
predictors supply the mask), score `gate` = |SiLU(gate)| * ||W_down[:, i]|| * mean|up_i| (read from the gate alone:
an engine skips the up and down rows too). While training, each forward zeroes the lowest-scoring `target` share of
the batch's values per layer (straight-through gradient), the target rising from 0 over `anneal.fraction` of the
run (no swap shock: step 0 computes the dense model); the `thresholds` section then fits fixed per-layer
thresholds on calibration tokens (by default at the end of the run, to this section's target_sparsity).

`form: relu` is the same rule on the ReLU form relu(gate) * up (what PowerInfer's sparse FFN and plain transformers
compute): the annealing moves SiLU(gate) * up to the thresholded relu(gate) * up, so the model computes relu(gate) * up
on every neuron it keeps, and an engine with perfect predictors computes exactly it."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from sparsetune.activations.base import (
    F,
    MLPActivation,
    PerLayerThresholds,
    per_layer_value,
    quantile_threshold,
    token_rows,
    torch,
)
from sparsetune.activations.relu import ReLU
from sparsetune.activations.silu import SiLU
from sparsetune.errors import SparsetuneError

# Values a forward's quantile is taken over per layer: enough for the target to within ~0.3%, cheap on 7B layers.
QUANTILE_SAMPLE = 1 << 16


class Config(PerLayerThresholds):
    activation: Literal["output_aware"]
    target_sparsity: float = Field(
        0.7, gt=0.0, lt=1.0, description="output_aware: share of each layer's neurons zeroed (per batch while "
        "training; the fixed thresholds fitted after it aim at it too, unless `thresholds` says otherwise).")
    form: Literal["silu", "relu"] = Field(
        "silu", description="output_aware: the elementwise activation kept neurons compute: silu = SwiGLU kept "
        "(best quality; no engine runs it sparse), relu = relu(gate) * up (what PowerInfer runs sparse).")
    score: Literal["product", "gate"] = Field(
        "product", description="output_aware: product = |SiLU(gate)*up| * ||W_down[:, i]|| (most accurate; an "
        "engine skips down rows only, or all three with predictors); gate = |SiLU(gate)| * ||W_down[:, i]|| * "
        "mean|up_i| (read from the gate: an engine skips up and down rows too).")
    thresholds: list[float] | None = Field(
        None, description="output_aware: fitted per-layer thresholds on the score (empty = per-batch quantile "
        "rule until the `thresholds` conversion fits them).")
    scales: list[list[float]] | None = Field(
        None, description="output_aware: per-layer per-neuron score scales (||W_down[:, i]||, times mean|up_i| for "
        "score gate), measured at the start of the run (kept in the activation state).")
    calibration_batches: int = Field(
        8, ge=1, description="output_aware: training micro-batches the score scales are measured on.")

    @field_validator("scales")
    @classmethod
    def _scales_not_negative(cls, scales: list[list[float]] | None) -> list[list[float]] | None:
        for layer, row in enumerate(scales or []):
            bad = next((i for i, s in enumerate(row) if s < 0), None)
            if bad is not None:  # a norm (times a mean |up|) is never negative
                raise ValueError(f"layer {layer}'s scale {bad} is {row[bad]:g}; score scales are norms, >= 0")
        return scales


class OutputAware(MLPActivation):
    """SiLU(gate) * up with the neurons of low output-aware score zeroed (see the module docstring).

    `threshold` NaN: the per-forward rule (the lowest `target_sparsity` share of this forward's scores, per layer;
    while annealing, that share times the annealing's progress); a number: the fixed rule score >= threshold.
    `scales` (a per-neuron list) is None until measured (`uncalibrated`)."""

    name, threshold_form, needs_data = "output_aware", "output_aware", True
    undropped = "silu"
    per_layer_keys: ClassVar[dict[str, str]] = {"thresholds": "threshold", "scales": "scales"}

    def __init__(self, target_sparsity: float, score: str = "product", threshold: float = float("nan"),
                 scales: list[float] | None = None, calibration_batches: int = 8, form: str = "silu"):
        self.target_sparsity = float(target_sparsity)
        self.form = form
        self.undropped = form  # compensation adds back the mean of what is cut from this elementwise activation
        self.score_kind = score
        self.rule_reads = "gate" if score == "gate" else "product"
        self.threshold = float(threshold)
        self.scales = None if scales is None else [float(s) for s in scales]
        self.calibration_batches = calibration_batches
        self._scale_tensor = None

    def _elementwise(self, gate):
        return F.relu(gate) if self.form == "relu" else F.silu(gate)

    @classmethod
    def from_config(cls, cfg, layer: int) -> OutputAware:
        t = per_layer_value(cfg.thresholds, layer, "thresholds")
        scales = per_layer_value(cfg.scales, layer, "scales")
        return cls(cfg.target_sparsity, cfg.score, float("nan") if t is None else t, scales, cfg.calibration_batches,
                   cfg.form)

    def uncalibrated(self) -> bool:
        return self.scales is None

    def with_threshold(self, threshold: float, sparsity: float = 0.5) -> OutputAware:
        """This activation with the fixed rule score >= threshold."""
        return OutputAware(self.target_sparsity, self.score_kind, threshold, self.scales, self.calibration_batches,
                           self.form)

    def scale_on(self, like):
        if self._scale_tensor is None or self._scale_tensor.device != like.device:
            self._scale_tensor = torch.tensor(self.scales, dtype=torch.float32, device=like.device)
        return self._scale_tensor

    def scores(self, gate, up):
        """The per-neuron output-aware score (float32, no graph)."""
        gate, up = gate.detach().float(), None if up is None else up.detach().float()
        value = self._elementwise(gate).abs() * (up.abs() if self.score_kind == "product" else 1.0)
        return value * self.scale_on(value)

    def batch_threshold(self, scores, target: float) -> float:
        """The threshold zeroing `target` of this forward's scores (the one quantile rule)."""
        flat = scores.reshape(-1)
        if flat.numel() > QUANTILE_SAMPLE:  # an even stride: deterministic, so resume stays bitwise
            flat = flat[:: math.ceil(flat.numel() / QUANTILE_SAMPLE)]
        return quantile_threshold(flat, target)

    def __call__(self, gate, up):
        return self._thresholded(gate, up, self.target_sparsity)

    def annealed(self, gate, up, progress: float):
        """The per-forward target rises with the annealing (a fixed threshold is final already); form relu also
        moves from SiLU(gate) * up to the thresholded relu(gate) * up (0 = the dense model exactly)."""
        sparse = self._thresholded(gate, up, self.target_sparsity * progress)
        if self.form == "silu" or progress >= 1:
            return sparse
        dense = F.silu(gate) * up
        return dense if progress <= 0 else torch.lerp(dense, sparse, progress)

    def _thresholded(self, gate, up, target: float):
        dense = self._elementwise(gate) * up
        if self.scales is None:
            return dense
        if math.isnan(self.threshold) and target <= 0:
            return dense
        s = self.scores(gate, up)
        t = self.batch_threshold(s, target) if math.isnan(self.threshold) else self.threshold
        sparse = torch.where(s >= t, dense, torch.zeros_like(dense))
        # Forward value: the thresholded activation; gradient: straight through to the dense one (as top-k).
        return dense + (sparse - dense).detach() if dense.requires_grad else sparse

    def elementwise(self) -> MLPActivation:
        # on a chosen subset of neurons the rule is the mask: what is kept computes the elementwise form
        return ReLU() if self.form == "relu" else SiLU()

    # ------------------------------------------------------------ the lifecycle's hooks
    @classmethod
    def calibrate(cls, layers, measure, seed=0, report=None) -> list[float]:
        """Each layer's per-neuron score scales: ||W_down[:, i]||, times mean|up_i| over the calibration tokens for
        the gate score (the dense SiLU model computing meanwhile). Fits no threshold (`unfixed_target`)."""
        sums = _UpSums({m.layer_idx: m for m in layers if m.activation.score_kind == "gate"})
        on = measure(sums, SiLU())
        for m in layers:
            weight = m.down_weight()
            if weight is None:
                raise SparsetuneError("relufy.activation=output_aware measures ||W_down[:, i]|| before the engine "
                                      "shards the model; this model's down_proj is already sharded")
            scales = weight.detach().float().norm(dim=0).cpu()
            if m.layer_idx in sums.sums:
                scales = scales * sums.sums[m.layer_idx] / max(1, sums.tokens[m.layer_idx])
            m.activation.scales = scales.tolist()
        if report is not None and layers:
            report(f"output_aware: measured the {layers[0].activation.score_kind} score's per-neuron scales of "
                   f"{len(layers)} layers on {on}")
        return []

    def unfixed_target(self) -> float | None:
        return self.target_sparsity if math.isnan(self.threshold) else None

    @classmethod
    def recipe_defaults(cls, cfg, recipe) -> None:
        """Its per-forward rule is for training only: fixed thresholds are fitted after the last step (to its
        target_sparsity) unless the recipe fits or gives them; the swap is annealed over half the run."""
        if not recipe.thresholds.enabled and not cfg.thresholds:
            recipe.thresholds.target_sparsity = cfg.target_sparsity
        if recipe.anneal.fraction is None:
            recipe.anneal.fraction = 0.5

    # as a threshold form: fixed per-layer thresholds on its own score (scales and score kind kept)
    @classmethod
    def thresholded_from(cls, current) -> OutputAware:
        return current

    def rule_values(self, gate, up):
        return self.scores(gate, up)

    def spec(self) -> dict:
        fitted = not math.isnan(self.threshold)
        return {"activation": self.name, "target_sparsity": self.target_sparsity, "form": self.form,
                "score": self.score_kind,
                "thresholds": [self.threshold] if fitted else None, "scales": [self.scales] if self.scales else None,
                "calibration_batches": self.calibration_batches}


class _UpSums:
    """A sink summing |up| per neuron over the real tokens, for the layers in `layers` (layer -> its SparseMLP)."""

    def __init__(self, layers: dict):
        self.layers, self.sums, self.tokens, self.mask = layers, {}, {}, None

    def record(self, layer: int, activation, mlp_input, gate) -> None:
        if layer in self.layers:
            up = self.layers[layer].projections()[1](token_rows(mlp_input, self.mask)).detach().float().abs()
            self.sums[layer] = self.sums.get(layer, 0) + up.sum(0).cpu()
            self.tokens[layer] = self.tokens.get(layer, 0) + up.shape[0]


ACTIVATION = OutputAware
