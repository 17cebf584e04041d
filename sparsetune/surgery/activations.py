"""MLP activations: each maps (gate, up) projections to the activation a that feeds down_proj.

a = act(gate) * up for the gated forms; sparsity is measured and regularized on a.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsetune.recipe.schema import RelufyConfig, relufy_config


class MLPActivation(nn.Module):
    """Base class. `hf_hidden_act` names the transformers activation computing the same function
    when the model is exported (None when plain transformers cannot express it). `exact_zeros`: inactive
    neurons are exactly 0 (every activation but plain SiLU), so sparsity is counted in exact zeros."""

    name: str = ""
    hf_hidden_act: str | None = None
    exact_zeros: bool = True

    def spec(self) -> dict:
        """JSON description, stored with exports so sparsetune can rebuild the activation."""
        return {"activation": self.name}

    def elementwise(self) -> MLPActivation:
        """The per-neuron function, for computing a chosen subset of neurons (itself unless the
        activation looks across neurons, as top-k does)."""
        return self


class SiLU(MLPActivation):
    name, hf_hidden_act, exact_zeros = "silu", "silu", False

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class ReLU(MLPActivation):
    name, hf_hidden_act = "relu", "relu"

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.relu(gate) * up


class ShiftedReLU(MLPActivation):
    """max(gate - b, 0) * up. Exportable as relu with gate bias -b where the config has `mlp_bias`."""

    name = "shifted_relu"

    def __init__(self, shift: float):
        super().__init__()
        self.shift = float(shift)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.relu(gate - self.shift) * up

    def spec(self) -> dict:
        return {"activation": self.name, "shift": self.shift}


class FATReLU(MLPActivation):
    """Thresholded ReLU: gate if gate >= t else 0 (ProSparse's final step). The rule reads the gate alone, so an
    engine can skip a neuron's up and down rows once its gate is below t. `per_layer`: t is this layer's own
    threshold (one of `relufy.thresholds`), so the spec lists every layer's."""

    name = "fatrelu"

    def __init__(self, threshold: float, per_layer: bool = False):
        super().__init__()
        self.threshold = float(threshold)
        self.per_layer = per_layer

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.where(gate >= self.threshold, gate, torch.zeros_like(gate)) * up

    def spec(self) -> dict:
        if self.per_layer:  # activation_spec() fills in every layer's threshold
            return {"activation": self.name, "thresholds": [self.threshold]}
        return {"activation": self.name, "threshold": self.threshold}


class DReLU(MLPActivation):
    """ReLU on both branches (TurboSparse): max(gate, 0) * max(up, 0)."""

    name = "drelu"

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.relu(gate) * F.relu(up)


class ReLU2(MLPActivation):
    """Squared ReLU on the gate: relu(gate)^2 * up (transformers' `relu2`)."""

    name, hf_hidden_act = "relu2", "relu2"

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.square(F.relu(gate)) * up


class TopK(MLPActivation):
    """Keep the k largest |SiLU(gate) * up| per token; the backward pass is straight-through (Q-Sparse)."""

    name = "topk"

    def __init__(self, fraction: float):
        super().__init__()
        self.fraction = float(fraction)

    def k_for(self, width: int) -> int:
        return max(1, math.ceil(self.fraction * width))

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        dense = F.silu(gate) * up
        k = self.k_for(dense.shape[-1])
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


class CATS(MLPActivation):
    """Training-free thresholding (CATS, Lee et al. 2024): SiLU(gate) where |SiLU(gate)| >= t, else 0; times up.

    `threshold` is per layer and comes from calibration (`sparsetune.surgery.calibration`); NaN means
    not yet calibrated, which computes plain SiLU."""

    name = "cats"

    def __init__(self, threshold: float, target_sparsity: float):
        super().__init__()
        self.threshold = float(threshold)
        self.target_sparsity = float(target_sparsity)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        act = F.silu(gate)
        if math.isnan(self.threshold):
            return act * up
        return torch.where(act.abs() >= self.threshold, act, torch.zeros_like(act)) * up

    def spec(self) -> dict:
        return {"activation": self.name, "target_sparsity": self.target_sparsity, "thresholds": [self.threshold]}


def build_activation(cfg: RelufyConfig | dict, layer: int = 0) -> MLPActivation:
    """Activation module from the recipe's `relufy` section (or an export's stored spec) for decoder layer `layer`."""
    if isinstance(cfg, dict):
        cfg = relufy_config(cfg)
    if cfg.activation in ("cats", "fatrelu"):
        thresholds = cfg.thresholds or []
        if thresholds and len(thresholds) <= layer:
            from sparsetune.errors import SparsetuneError

            raise SparsetuneError(f"relufy.thresholds has {len(thresholds)} values but the model has more layers")
        if cfg.activation == "cats":
            return CATS(thresholds[layer] if thresholds else float("nan"), cfg.target_sparsity)
        if thresholds:
            return FATReLU(thresholds[layer], per_layer=True)
    builders = {
        "silu": SiLU,
        "relu": ReLU,
        "shifted_relu": lambda: ShiftedReLU(cfg.shift),
        "fatrelu": lambda: FATReLU(cfg.threshold),
        "drelu": DReLU,
        "relu2": ReLU2,
        "topk": lambda: TopK(cfg.top_k_fraction),
    }
    return builders[cfg.activation]()
