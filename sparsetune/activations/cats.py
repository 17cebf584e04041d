"""cats: SiLU(gate) zeroed where |SiLU(gate)| is below a per-layer threshold calibrated on training data to
target_sparsity (CATS, training-free)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from sparsetune.activations.base import F, MLPActivation, PerLayerThresholds, per_layer_value, torch


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

    `threshold` is per layer and comes from calibration (`sparsetune.surgery.calibration`); NaN means not yet
    calibrated, which computes plain SiLU. The rule reads the gate alone."""

    name, plain_fallback, threshold_form, needs_data = "cats", "silu", "cats", True
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

    def spec(self) -> dict:
        return {"activation": self.name, "target_sparsity": self.target_sparsity, "thresholds": [self.threshold]}


ACTIVATION = CATS
