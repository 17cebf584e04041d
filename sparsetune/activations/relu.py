"""relu: ReLU(gate)*up."""

from __future__ import annotations

from typing import Literal

from sparsetune.activations.base import F, MLPActivation
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["relu"] = "relu"


class ReLU(MLPActivation):
    name, hf_hidden_act, threshold_form, fused_code = "relu", "relu", "fatrelu", 0
    powerinfer_refusal = None  # its sparse llama FFN computes relu(gate) * up (llama.cpp:5050 in PowerInfer)

    def __call__(self, gate, up):
        return F.relu(gate) * up


ACTIVATION = ReLU
