"""drelu: ReLU(gate)*ReLU(up) (TurboSparse)."""

from __future__ import annotations

from typing import Literal

from sparsetune.activations.base import F, MLPActivation
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["drelu"]


class DReLU(MLPActivation):
    """ReLU on both branches: max(gate, 0) * max(up, 0). Zeros come from either branch (the rule reads gate and
    up)."""

    name, rule_reads = "drelu", "product"

    def __call__(self, gate, up):
        return F.relu(gate) * F.relu(up)


ACTIVATION = DReLU
