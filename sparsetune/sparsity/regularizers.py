"""Sparsity-inducing penalties on the MLP activation a (shape [..., tokens, neurons]).

Each returns a per-layer scalar averaged over real (non-padding) tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

Regularizer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _masked_token_mean(per_token: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return per_token.mean()
    weights = token_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def l1(a: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |a| over real tokens and all neurons."""
    return _masked_token_mean(a.abs().mean(dim=-1), token_mask)


def hoyer(a: torch.Tensor, token_mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Per token (sum|a|)^2 / sum a^2, divided by the number of neurons (so it lies in (0, 1]), averaged.

    Scale-invariant: it rewards concentrating activation mass on few neurons, not shrinking it.
    """
    a = a.float()
    per_token = a.abs().sum(dim=-1).square() / (a.square().sum(dim=-1) + eps) / a.shape[-1]
    return _masked_token_mean(per_token, token_mask)


REGULARIZERS: dict[str, Regularizer] = {"l1": l1, "hoyer": hoyer}
