"""relu2: ReLU(gate)^2*up."""

from __future__ import annotations

from typing import Literal

from sparsetune.activations.base import F, MLPActivation, torch
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["relu2"]


class ReLU2(MLPActivation):
    """Squared ReLU on the gate: relu(gate)^2 * up (transformers' `relu2`)."""

    name = "relu2"

    def __call__(self, gate, up):
        return torch.square(F.relu(gate)) * up


ACTIVATION = ReLU2
