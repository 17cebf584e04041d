"""shifted_relu: ReLU(gate - shift)*up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sparsetune.activations.base import F, MLPActivation
from sparsetune.activations.relu import ReLU
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["shifted_relu"]
    shift: float = Field(1.0, description="b in shifted_relu: max(gate - b, 0).")


class ShiftedReLU(MLPActivation):
    """max(gate - b, 0) * up: ReLU of the gate shifted by b (`gate_shift`), which an export can fold into a gate
    bias of -b."""

    name = "shifted_relu"

    def __init__(self, shift: float):
        self.shift = float(shift)

    @classmethod
    def from_config(cls, cfg, layer: int) -> ShiftedReLU:
        return cls(cfg.shift)

    def __call__(self, gate, up):
        return F.relu(gate - self.shift) * up

    def spec(self) -> dict:
        return {"activation": self.name, "shift": self.shift}

    def gate_shift(self):
        return ReLU(), self.shift


ACTIVATION = ShiftedReLU
