"""l1: mean |a| over real tokens and all neurons (ProSparse's penalty)."""

from __future__ import annotations

import torch

from sparsetune.sparsity.regularizers._common import masked_token_mean


def penalty(a: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    return masked_token_mean(a.abs().mean(dim=-1), token_mask)
