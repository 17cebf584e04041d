"""Prompt-to-continuation overlap: how well do the prompt's most active neurons cover what comes after?

Each sequence's first part is the prompt (the same split as the `prompt` mode of `eval --dynamic`,
`evaluation.dynamic.PromptMasks`). Per layer and sequence the prompt's neurons are ranked by their contribution
|a_j| * ||W_d[:, j]|| summed over the prompt's tokens, and the top fraction k is kept. For every continuation token:

  count  the share of its active neurons that the kept set contains
  mass   the share of its total contribution (activation mass) that the kept set carries

averaged over the continuation's tokens, as a function of k. A kept set drawn at random covers k of the count on
average; a model whose active set never changes is fully covered once k reaches its active fraction.
"""

from __future__ import annotations

import torch

from sparsetune.evaluation.dynamic import PromptMasks
from sparsetune.sparsity.cett import contributions

KEPT_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def layer_prompt_overlap(a: torch.Tensor, down_norms: torch.Tensor, active: torch.Tensor, prompt_fraction: float,
                         kept_fractions=KEPT_FRACTIONS) -> dict:
    """{'count': {k: coverage}, 'mass': {k: coverage}} for one layer: activations `a` [N, T, m], its down norms
    [m] and active masks [N, T, m]."""
    s = contributions(a, down_norms)
    p = PromptMasks(prompt_fraction).prompt_len(a.shape[1])
    prompt_mass = s[:, :p].sum(dim=1)  # [N, m]
    cont_s, cont_active = s[:, p:], active[:, p:]
    has_active = cont_active.any(-1)
    total = cont_s.sum(-1)
    out = {"count": {}, "mass": {}}
    for k in kept_fractions:
        kept = PromptMasks(prompt_fraction, keep=k).select(prompt_mass)[:, None, :]  # [N, 1, m]
        covered = (cont_active & kept).sum(-1).float() / cont_active.sum(-1).clamp_min(1)
        out["count"][k] = float(covered[has_active].mean()) if has_active.any() else None
        mass = (cont_s * kept).sum(-1) / total.clamp_min(torch.finfo(torch.float32).tiny)
        out["mass"][k] = float(mass[total > 0].mean()) if (total > 0).any() else None
    return out
