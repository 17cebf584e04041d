"""Low-rank per-layer predictors (DejaVu style): Linear(d -> r) [-> act] -> Linear(r -> m)."""

from __future__ import annotations

import torch
from torch import nn

_ACTS = {"none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}


class LowRankPredictor(nn.Module):
    """Logits over `out_features` units (MLP neurons or attention heads) from a hidden state."""

    def __init__(self, in_features: int, rank: int, out_features: int, nonlinearity: str = "none",
                 bias: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.act = _ACTS[nonlinearity]()
        self.up = nn.Linear(rank, out_features, bias=bias)
        # Start undecided (logit 0 everywhere): the class-balanced loss then moves each unit toward its rate.
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def build_predictors(num_layers: int, hidden: int, rank: int | list[int], out_features: int, nonlinearity: str,
                     bias: bool = True) -> nn.ModuleList:
    """`num_layers` predictors of one rank, or of one rank each (a list of `num_layers` ranks)."""
    ranks = [rank] * num_layers if isinstance(rank, int) else list(rank)
    if len(ranks) != num_layers:
        raise ValueError(f"{len(ranks)} ranks for {num_layers} predictors")
    return nn.ModuleList(LowRankPredictor(hidden, r, out_features, nonlinearity, bias) for r in ranks)
