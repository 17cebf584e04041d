"""silu: the model's own SiLU(gate)*up, unchanged (no exact zeros; measured as near-zero sparsity)."""

from __future__ import annotations

from typing import Literal

from sparsetune.activations.base import F, MLPActivation
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["silu"]


class SiLU(MLPActivation):
    name, exact_zeros, threshold_form, rule_reads = "silu", False, "cats", "none"

    def __call__(self, gate, up):
        return F.silu(gate) * up


ACTIVATION = SiLU
