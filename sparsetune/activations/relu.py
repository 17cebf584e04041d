"""relu: ReLU(gate)*up."""

from __future__ import annotations

from typing import Literal

from sparsetune.activations.base import F, MLPActivation
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["relu"] = "relu"


class ReLU(MLPActivation):
    name, threshold_form = "relu", "fatrelu"

    def __call__(self, gate, up):
        return F.relu(gate) * up


ACTIVATION = ReLU
