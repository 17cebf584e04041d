"""fatrelu: gate*[gate >= threshold]*up (ProSparse's final step), one threshold or one per layer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sparsetune.activations.base import MLPActivation, PerLayerThresholds, per_layer_value, torch


class Config(PerLayerThresholds):
    activation: Literal["fatrelu"]
    threshold: float = Field(0.01, ge=0.0, description="t in fatrelu: gate values below t become 0.")
    thresholds: list[float] | None = Field(
        None, description="fatrelu: per-layer thresholds on the gate, one per decoder layer; when given they "
        "replace `threshold` (ProSparse's per-layer shift: what the `thresholds` section fits; exports carry them "
        "in sparsetune.json, which plain transformers cannot read).")


class FATReLU(MLPActivation):
    """Thresholded ReLU: gate if gate >= t else 0. The rule reads the gate alone, so an engine can skip a neuron's
    up and down rows once its gate is below t. `per_layer`: t is this layer's own threshold (one of
    `relufy.thresholds`), so the spec lists every layer's."""

    name, threshold_form, threshold_floor = "fatrelu", "fatrelu", 0.0
    undropped = "relu"

    def __init__(self, threshold: float, per_layer: bool = False):
        self.threshold = float(threshold)
        self.per_layer = per_layer

    @classmethod
    def from_config(cls, cfg, layer: int) -> FATReLU:
        own = per_layer_value(cfg.thresholds, layer, "thresholds")
        return cls(cfg.threshold) if own is None else cls(own, per_layer=True)

    def __call__(self, gate, up):
        return torch.where(gate >= self.threshold, gate, torch.zeros_like(gate)) * up

    # as a threshold form (the `thresholds` conversion of relu-family runs: ProSparse's last step)
    @classmethod
    def thresholded_from(cls, current) -> FATReLU:
        return cls(0.0, per_layer=True)

    def rule_values(self, gate, up):
        return gate.detach().float()

    def with_threshold(self, threshold: float, sparsity: float = 0.5) -> FATReLU:
        return FATReLU(threshold, per_layer=True)

    def spec(self) -> dict:
        if self.per_layer:  # activation_spec() fills in every layer's threshold
            return {"activation": self.name, "thresholds": [self.threshold]}
        return {"activation": self.name, "threshold": self.threshold}


ACTIVATION = FATReLU
