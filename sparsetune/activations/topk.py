"""topk: keep the top_k_fraction largest |SiLU(gate)*up| per token (straight-through gradient)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from sparsetune.activations.base import F, MLPActivation, torch
from sparsetune.activations.silu import SiLU
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["topk"]
    top_k_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="Fraction of MLP neurons kept per token by topk (0.1 = 90% sparsity).")


class TopK(MLPActivation):
    """Keep the k largest |SiLU(gate) * up| per token; the backward pass is straight-through (Q-Sparse). The rule
    needs up and a sort across neurons: an engine skips only down rows, after computing every gate and up row."""

    name, threshold_form, rule_reads = "topk", "cats", "product"
    undropped = "silu"

    def __init__(self, fraction: float):
        self.fraction = float(fraction)

    @classmethod
    def from_config(cls, cfg, layer: int) -> TopK:
        return cls(cfg.top_k_fraction)

    def __call__(self, gate, up):
        return self._top(gate, up, self.fraction)

    def annealed(self, gate, up, progress: float):
        """The kept share falls from every neuron to top_k_fraction as the annealing progresses."""
        return self._top(gate, up, 1.0 - progress * (1.0 - self.fraction))

    def _top(self, gate, up, fraction: float):
        dense = F.silu(gate) * up
        k = max(1, math.ceil(fraction * dense.shape[-1]))
        if k >= dense.shape[-1]:
            return dense
        idx = dense.detach().abs().topk(k, dim=-1).indices
        sparse = torch.zeros_like(dense).scatter(-1, idx, dense.gather(-1, idx))
        # Forward value: the top-k activations; gradient: identity to the dense activation.
        return dense + (sparse - dense).detach()

    def spec(self) -> dict:
        return {"activation": self.name, "top_k_fraction": self.fraction}

    def elementwise(self) -> MLPActivation:
        return SiLU()


ACTIVATION = TopK
