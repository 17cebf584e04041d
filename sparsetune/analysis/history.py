"""History dependence: the same token id in different contexts, does it activate the same neurons?

Pairs of occurrences of one token id in two different sequences (at most `per_token` pairs per id, so frequent
tokens do not dominate) give the mean Jaccard overlap of their active sets, J_same; pairs of different token ids
from different sequences give the chance level, J_random. Reported per layer:

  history_dependence  1 - J_same: 0 when a token's active set is fixed by its id, whatever came before it
  token_explained     (J_same - J_random) / (1 - J_random): the share of the overlap beyond chance that the token id
                      accounts for (1: the id fixes the mask; 0: knowing the id helps no more than knowing nothing);
                      its complement is the context's share. Undefined (None) when every mask is the same.
"""

from __future__ import annotations

import torch

from sparsetune.analysis.inertia import jaccard, random_pairs

Pairs = tuple[torch.Tensor, torch.Tensor]


def same_token_pairs(token_ids: torch.Tensor, per_token: int = 8, seed: int = 0) -> Pairs:
    """Flat [N * T] indices of pairs of occurrences (positions >= 1) of the same token id in different sequences."""
    n, t = token_ids.shape
    g = torch.Generator().manual_seed(seed)
    ids = token_ids[:, 1:].reshape(-1)
    flat = (torch.arange(n)[:, None] * t + torch.arange(1, t)[None, :]).reshape(-1)
    seq = flat // t
    order = ids.argsort(stable=True)
    _, counts = ids[order].unique_consecutive(return_counts=True)
    left, right = [], []
    for members in order.split(counts.tolist()):
        if members.numel() < 2 or seq[members].unique().numel() < 2:
            continue
        tries = torch.randint(0, members.numel(), (2, 4 * per_token), generator=g)
        a, b = members[tries[0]], members[tries[1]]
        keep = (seq[a] != seq[b]).nonzero().squeeze(1)[:per_token]
        left.append(flat[a[keep]])
        right.append(flat[b[keep]])
    if not left:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(left), torch.cat(right)


def different_token_pairs(token_ids: torch.Tensor, count: int, seed: int = 0) -> Pairs:
    """About `count` pairs (positions >= 1) of different token ids from different sequences: the chance level."""
    pairs = random_pairs(tuple(token_ids.shape), 2 * count, seed)
    if pairs is None:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    ids = token_ids.reshape(-1)
    keep = (ids[pairs[0]] != ids[pairs[1]]).nonzero().squeeze(1)[:count]
    return pairs[0][keep], pairs[1][keep]


def layer_history(active: torch.Tensor, same: Pairs, different: Pairs) -> dict:
    """{'same_token', 'random', 'history_dependence', 'token_explained'} for one layer's [N, T, m] active masks."""
    flat = active.reshape(-1, active.shape[-1])
    if same[0].numel() == 0 or different[0].numel() == 0:
        return {"same_token": None, "random": None, "history_dependence": None, "token_explained": None}
    j_same = float(jaccard(flat[same[0]], flat[same[1]]).mean())
    j_rand = float(jaccard(flat[different[0]], flat[different[1]]).mean())
    explained = (j_same - j_rand) / (1 - j_rand) if j_rand < 1 - 1e-9 else None
    return {"same_token": j_same, "random": j_rand, "history_dependence": 1 - j_same, "token_explained": explained}
