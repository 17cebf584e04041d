"""Shared by the penalties: averaging over real (non-padding) tokens."""

from __future__ import annotations

import torch


def masked_token_mean(per_token: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return per_token.mean()
    weights = token_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)
