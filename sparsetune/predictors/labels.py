"""What counts as an active unit (the predictors' labels), and the losses that train toward them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neuron_labels(a: torch.Tensor, exact_zeros: bool, active_fraction: float) -> torch.Tensor:
    """Bool mask of active neurons. ReLU family: a != 0. SiLU (no exact zeros): the top
    `active_fraction` of neurons by |a| in each token."""
    if exact_zeros:
        return a != 0
    return top_fraction(a.abs(), active_fraction)


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the top ceil(fraction * n) entries of the last dimension."""
    n = scores.shape[-1]
    k = max(1, min(n, int(-(-fraction * n // 1))))
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def head_norms(attn_out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head output norms [..., heads] from the attention output before o_proj [..., heads * head_dim]."""
    return attn_out.unflatten(-1, (num_heads, -1)).norm(dim=-1)


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """BCE with positives weighted by (#negatives / #positives) of this batch, so rare classes count.

    With `importance`, each positive's weight is further scaled by its importance over the mean importance of the
    batch's positives (so the positives' total weight is unchanged): missing a neuron that carries much of the
    MLP output costs more than missing one that carries almost none."""
    target = labels.float()
    pos = target.sum()
    neg = target.numel() - pos
    pos_weight = (neg / pos.clamp_min(1.0)).clamp(0.01, 100.0)
    if importance is None:
        return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=pos_weight)
    imp = importance.float() * target
    scale = imp / (imp.sum() / pos.clamp_min(1.0)).clamp_min(1e-12)  # mean 1 over the positives
    weight = torch.where(target > 0, scale * pos_weight, torch.ones_like(target))
    return F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight)


def focal(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    target = labels.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()
