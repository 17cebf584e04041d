"""CETT: the relative error of an MLP's output when its small activations are dropped.

For one token with activation a (after the activation function, before down_proj) and down weight W_d, neuron j
contributes a_j * W_d[:, j] to the output, with magnitude s_j = |a_j| * ||W_d[:, j]||. Dropping every neuron with
s_j < tau gives

    CETT(tau) = || sum_{j: s_j < tau} a_j W_d[:, j] || / || sum_j a_j W_d[:, j] ||

(Luo et al., "Sparsing Law", arXiv 2411.02335; Zhang et al.'s CETT). One threshold tau per layer, shared by all
tokens, is what an engine can apply; the *effective sparsity at a CETT budget* is the share of s_j below the largest
tau whose mean CETT stays within the budget. It compares ReLU-family models (exact zeros, CETT 0 at tau 0) and SiLU
models (no exact zeros) on one scale.
"""

from __future__ import annotations

import torch


def contributions(a: torch.Tensor, down_norms: torch.Tensor | None) -> torch.Tensor:
    """s_j = |a_j| * ||W_d[:, j]|| (or |a_j| when the down norms are unknown), float32, same shape as `a`."""
    s = a.detach().float().abs()
    return s if down_norms is None else s * down_norms.to(s.device, torch.float32)


def cett(a: torch.Tensor, down_weight: torch.Tensor, threshold: float | torch.Tensor,
         down_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token CETT of dropping neurons with contribution below `threshold`. `a`: [tokens, m];
    `down_weight`: [d, m] (nn.Linear layout). Returns [tokens]; a token whose full output is zero has CETT 0."""
    a = a.detach().float().reshape(-1, a.shape[-1])
    w = down_weight.detach().float()
    norms = w.norm(dim=0) if down_norms is None else down_norms
    dropped = a * (contributions(a, norms) < threshold)
    full = (a @ w.T).norm(dim=-1)
    err = (dropped @ w.T).norm(dim=-1)
    return torch.where(full > 0, err / full.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(full))


def threshold_for_cett(a: torch.Tensor, down_weight: torch.Tensor, budget: float, iterations: int = 30
                       ) -> tuple[float, float, float]:
    """The largest contribution threshold whose mean CETT over the tokens of `a` is within `budget`, found by
    bisection (mean CETT grows with the threshold). Returns (threshold, mean CETT there, sparsity there: the share
    of contributions strictly below the threshold)."""
    a = a.detach().float().reshape(-1, a.shape[-1])
    w = down_weight.detach().float()
    norms = w.norm(dim=0)
    s = contributions(a, norms)
    lo, hi = 0.0, float(s.max()) * (1 + 1e-6) + 1e-30
    lo_err = float(cett(a, w, lo, norms).mean())
    if lo_err > budget:  # even dropping nothing (only exact zeros, which add nothing) is over: keep everything
        return 0.0, lo_err, float((s < 0).float().mean())
    for _ in range(iterations):
        mid = (lo + hi) / 2
        err = float(cett(a, w, mid, norms).mean())
        if err <= budget:
            lo, lo_err = mid, err
        else:
            hi = mid
    return lo, lo_err, float((s < lo).float().mean())


def sparsity_at_cett(a: torch.Tensor, down_weight: torch.Tensor, budget: float) -> float:
    """Effective sparsity of one layer at a CETT budget (e.g. 0.01 or 0.2): the share of neurons that can be
    dropped with one threshold while the mean relative MLP-output error stays within the budget."""
    return threshold_for_cett(a, down_weight, budget)[2]
