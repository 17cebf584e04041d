"""Per-layer sparsity three ways, and the one definition of an active neuron the other analyses use.

  exact_zero   share of activations that are exactly 0 (ReLU family; ~0 for SiLU)
  near_zero    share with |a| <= the near-zero threshold (1e-3)
  cett_1pct / cett_20pct
               CETT effective sparsity: the share of neurons one per-layer contribution threshold can drop while the
               mean relative MLP-output error stays within 1% / 20% (`sparsity/cett.py`)

Active neurons: for an activation with exact zeros, a != 0. SiLU has none, so there a neuron is active when its
contribution |a_j| * ||W_d[:, j]|| reaches the layer's CETT-20% threshold: the neurons left after dropping all that
one threshold can drop at 20% error. Both definitions are "the neurons that matter", so ReLU and SiLU models are
compared on one footing; the report says which one a model used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsetune.analysis.collect import Collection
from sparsetune.sparsity.cett import contributions, threshold_for_cett

CETT_BUDGETS = (0.01, 0.2)
ACTIVE_BUDGET = 0.2  # the CETT budget that defines active SiLU neurons


@dataclass
class LayerSparsity:
    exact_zero: float
    near_zero: float
    cett: dict[float, float]  # budget -> effective sparsity
    active_threshold: float | None  # SiLU: the contribution threshold of "active"; None: a != 0
    active_fraction: float  # mean share of active neurons per token


def cett_key(budget: float) -> str:
    """The name of the effective sparsity at a CETT budget: cett_1pct, cett_20pct."""
    return f"cett_{budget * 100:g}pct"


def cett_sample(tokens: int, size: int, seed: int = 0) -> torch.Tensor:
    """Indices of the tokens CETT thresholds are fitted on (all of them when `size` covers them)."""
    if size >= tokens:
        return torch.arange(tokens)
    return torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def layer_sparsity(collection: Collection, layer: int, near_zero_threshold: float = 1e-3,
                   cett_tokens: int = 256, budgets=CETT_BUDGETS, seed: int = 0) -> LayerSparsity:
    """The sparsity figures of one layer; CETT thresholds are fitted on `cett_tokens` sampled tokens."""
    a = collection.activations[layer].reshape(-1, collection.activations[layer].shape[-1])
    w = collection.down_weights[layer]
    sample = a[cett_sample(a.shape[0], cett_tokens, seed + layer)]
    fits = {b: threshold_for_cett(sample, w, b) for b in set(budgets) | {ACTIVE_BUDGET}}
    active_threshold = None if collection.exact_zeros else fits[ACTIVE_BUDGET][0]
    active = active_mask(collection, layer, active_threshold)
    return LayerSparsity(exact_zero=float((a == 0).float().mean()),
                         near_zero=float((a.abs() <= near_zero_threshold).float().mean()),
                         cett={b: fits[b][2] for b in budgets}, active_threshold=active_threshold,
                         active_fraction=float(active.float().mean()))


def active_mask(collection: Collection, layer: int, threshold: float | None) -> torch.Tensor:
    """[N, T, m] bool: a != 0 when `threshold` is None, else contribution >= threshold."""
    a = collection.activations[layer]
    if threshold is None:
        return a != 0
    return contributions(a, collection.down_norms(layer)) >= threshold


def active_definition(collection: Collection) -> str:
    if collection.exact_zeros:
        return f"a != 0 ({collection.activation} has exact zeros)"
    return (f"contribution |a_j| * ||W_d[:, j]|| >= the layer's CETT-{ACTIVE_BUDGET:.0%} threshold "
            f"({collection.activation} has no exact zeros)")
