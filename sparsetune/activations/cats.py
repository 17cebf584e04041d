"""cats: SiLU(gate) zeroed where |SiLU(gate)| is below a per-layer threshold calibrated on training data to
target_sparsity (CATS, training-free)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from sparsetune.activations.base import (
    F,
    MLPActivation,
    PerLayerThresholds,
    per_layer_value,
    quantile_threshold,
    token_rows,
    torch,
)
from sparsetune.activations.silu import SiLU

# Values kept per layer per batch: enough for a quantile accurate to ~0.1%, small enough for 7B layers.
SAMPLE_PER_BATCH = 1 << 17


class Config(PerLayerThresholds):
    activation: Literal["cats"]
    target_sparsity: float = Field(
        0.5, gt=0.0, lt=1.0, description="cats: fraction of |SiLU(gate)| values each layer's threshold zeroes "
        "on the calibration data.")
    thresholds: list[float] | None = Field(
        None, description="cats: per-layer thresholds on |SiLU(gate)|. Empty = calibrate at the start of the run "
        "(kept in each checkpoint's activation state, so resume, export and eval reuse them).")
    calibration_batches: int = Field(
        8, ge=1, description="cats: training micro-batches whose activations set the thresholds.")


class CATS(MLPActivation):
    """Training-free thresholding (CATS, Lee et al. 2024): SiLU(gate) where |SiLU(gate)| >= t, else 0; times up.

    `threshold` is per layer and comes from calibration (`calibrate`, which the lifecycle calls at the start of a
    run); NaN means not yet calibrated, which computes plain SiLU. The rule reads the gate alone."""

    name, threshold_form, needs_data = "cats", "cats", True
    undropped = "silu"

    def __init__(self, threshold: float, target_sparsity: float, calibration_batches: int = 8):
        self.threshold = float(threshold)
        self.target_sparsity = float(target_sparsity)
        self.calibration_batches = calibration_batches

    @classmethod
    def from_config(cls, cfg, layer: int) -> CATS:
        own = per_layer_value(cfg.thresholds, layer, "thresholds")
        return cls(float("nan") if own is None else own, cfg.target_sparsity, cfg.calibration_batches)

    def uncalibrated(self) -> bool:
        return math.isnan(self.threshold)

    def __call__(self, gate, up):
        act = F.silu(gate)
        if math.isnan(self.threshold):
            return act * up
        return torch.where(act.abs() >= self.threshold, act, torch.zeros_like(act)) * up

    @classmethod
    def calibrate(cls, layers, measure, seed=0, report=None) -> list[float]:
        """Each layer's threshold: the |SiLU(gate)| quantile that zeroes target_sparsity of its values over the
        real tokens of the calibration batches (the dense SiLU model computing meanwhile)."""
        sampler = _Sampler(seed)
        on = measure(sampler, SiLU())
        thresholds = []
        for m in layers:
            m.activation.threshold = quantile_threshold(torch.cat(sampler.samples[m.layer_idx]),
                                                        m.activation.target_sparsity)
            thresholds.append(m.activation.threshold)
        if report is not None and thresholds:
            report(f"cats: calibrated {len(thresholds)} layer thresholds to {layers[0].activation.target_sparsity:.0%} "
                   f"sparsity on {on} (range {min(thresholds):.4g}..{max(thresholds):.4g})")
        return thresholds

    # as a threshold form (the `thresholds` conversion of SiLU-based runs: exact zeros without a sort)
    @classmethod
    def thresholded_from(cls, current) -> CATS:
        return cls(float("nan"), 0.5)

    def rule_values(self, gate, up):
        return F.silu(gate.detach().float()).abs()

    def with_threshold(self, threshold: float, sparsity: float = 0.5) -> CATS:
        # target_sparsity is informational once the threshold is set
        return CATS(threshold, min(max(sparsity, 1e-3), 1 - 1e-3))

    def spec(self) -> dict:
        return {"activation": self.name, "target_sparsity": self.target_sparsity, "thresholds": [self.threshold]}


class _Sampler:
    """A sink sampling each layer's |SiLU(gate)| over the real tokens of each batch (at most SAMPLE_PER_BATCH)."""

    def __init__(self, seed: int):
        self.samples: dict[int, list] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.mask = None

    def record(self, layer: int, activation, mlp_input, gate) -> None:
        flat = token_rows(F.silu(gate.detach()).abs(), self.mask).reshape(-1).float().cpu()
        if flat.numel() > SAMPLE_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (SAMPLE_PER_BATCH,), generator=self.generator)]
        self.samples.setdefault(layer, []).append(flat)


ACTIVATION = CATS
