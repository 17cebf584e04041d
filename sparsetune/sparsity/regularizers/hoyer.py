"""hoyer: per token (sum|a|)^2 / sum a^2, divided by the number of neurons (so it lies in (0, 1]), averaged.

Scale-invariant: it rewards concentrating activation mass on few neurons, not shrinking it.
"""

from __future__ import annotations

import torch

from sparsetune.sparsity.regularizers._common import masked_token_mean


def penalty(a: torch.Tensor, token_mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    a = a.float()
    per_token = a.abs().sum(dim=-1).square() / (a.square().sum(dim=-1) + eps) / a.shape[-1]
    return masked_token_mean(per_token, token_mask)
