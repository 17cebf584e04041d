"""Activation inertia: do neighbouring tokens activate the same neurons?

For one layer's active masks [N sequences, T tokens, m neurons]: the mean Jaccard overlap |A & B| / |A | B| of the
active sets of tokens d apart in the same sequence (d = 1: consecutive tokens; the decay with d), against pairs of
random tokens from different sequences (what overlap chance and the layer's always-on neurons give). A model whose
active set never changes scores 1 everywhere. The first position of every sequence (it attends only to itself and
often carries outsized activations) is left out.
"""

from __future__ import annotations

import torch

DISTANCES = (1, 2, 4, 8, 16, 32, 64, 128)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., m] bool x [..., m] bool -> [...] Jaccard overlap; two empty sets count as identical (1)."""
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def random_pairs(shape: tuple[int, int], count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`count` pairs of flat token indices (positions >= 1) from two different sequences of an [N, T] batch; None
    with a single sequence."""
    n, t = shape
    if n < 2 or t < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    seq_a = torch.randint(0, n, (count,), generator=g)
    seq_b = (seq_a + torch.randint(1, n, (count,), generator=g)) % n  # any other sequence
    pos_a, pos_b = (torch.randint(1, t, (count,), generator=g) for _ in range(2))
    return seq_a * t + pos_a, seq_b * t + pos_b


def layer_inertia(active: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None,
                  distances=DISTANCES) -> dict:
    """{'consecutive', 'random', 'by_distance': {d: mean Jaccard}} for one layer's [N, T, m] active masks."""
    masks = active[:, 1:]
    by_distance = {d: float(jaccard(masks[:, d:], masks[:, :-d]).mean()) for d in distances if d < masks.shape[1]}
    flat = active.reshape(-1, active.shape[-1])
    rand = float(jaccard(flat[pairs[0]], flat[pairs[1]]).mean()) if pairs is not None else None
    return {"consecutive": by_distance.get(1), "random": rand, "by_distance": by_distance}
