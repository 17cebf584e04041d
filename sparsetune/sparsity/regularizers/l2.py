"""l2: mean a^2 over real tokens and all neurons (weight decay on activations; with l1, an elastic net).

Added as one file, with no other edit, to show how a regularizer joins sparsetune: the recipe accepts
`regularizer.type: l2`, the coefficient schedules apply, and the run logs `train/reg_loss`.
"""

from __future__ import annotations

import torch

from sparsetune.sparsity.regularizers._common import masked_token_mean


def penalty(a: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    return masked_token_mean(a.float().square().mean(dim=-1), token_mask)
