"""shifted_relu: ReLU(gate - shift)*up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sparsetune.activations.base import F, MLPActivation, torch
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["shifted_relu"]
    shift: float = Field(1.0, description="b in shifted_relu: max(gate - b, 0).")


class ShiftedReLU(MLPActivation):
    """max(gate - b, 0) * up. Exported as relu with gate bias -b where the model's config has `mlp_bias`."""

    name = "shifted_relu"
    powerinfer_refusal = "PowerInfer loads no gate bias to fold the shift into"

    def __init__(self, shift: float):
        self.shift = float(shift)

    @classmethod
    def from_config(cls, cfg, layer: int) -> ShiftedReLU:
        return cls(cfg.shift)

    def __call__(self, gate, up):
        return F.relu(gate - self.shift) * up

    def spec(self) -> dict:
        return {"activation": self.name, "shift": self.shift}

    def export_plain(self, lm, mlps, layout):
        """max(g - b, 0) == relu(gate_proj(x)) with gate bias -b: plain transformers' MLP with `mlp_bias`."""
        if not layout.mlp_bias_config:
            return None
        lm.config.mlp_bias = True
        for mlp in mlps:
            for proj in mlp.projections():
                if proj.bias is None:
                    proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype,
                                                               device=proj.weight.device))
            with torch.no_grad():
                mlp.projections()[0].bias.sub_(self.shift)
        lm.config.hidden_act = "relu"
        return {"activation": "relu"}, (
            f"shifted ReLU max(gate - {self.shift:g}, 0) is folded into a gate bias of -{self.shift:g} "
            "(`mlp_bias: true`, `hidden_act: relu`): plain transformers computes it exactly.")


ACTIVATION = ShiftedReLU
