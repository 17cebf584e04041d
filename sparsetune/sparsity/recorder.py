"""Activation capture: every SparseMLP hands its activation to the recorder once per forward.

From that single capture the recorder accumulates sparsity counts (over real tokens only)
and the regularizer term of the step. Counts stay on the device; nothing syncs with the
host until `SparsityStats.summary()` is called at logging time.
"""

from __future__ import annotations

import torch

from sparsetune.sparsity.regularizers import Regularizer


class SparsityStats:
    """Per-layer counts of zero (and near-zero) activations over real tokens."""

    def __init__(self, num_layers: int, near_zero_threshold: float | None):
        self.num_layers = num_layers
        self.near_zero_threshold = near_zero_threshold
        self.zeros: list[torch.Tensor | int] = [0] * num_layers
        self.near_zeros: list[torch.Tensor | int] = [0] * num_layers
        self.totals: list[torch.Tensor | int] = [0] * num_layers

    def add(self, layer: int, a: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        a = a.detach()
        zero_per_token = (a == 0).sum(dim=-1)
        near_per_token = (a.abs() <= self.near_zero_threshold).sum(dim=-1) if self.near_zero_threshold else None
        if token_mask is None:
            self.zeros[layer] = self.zeros[layer] + zero_per_token.sum()
            if near_per_token is not None:
                self.near_zeros[layer] = self.near_zeros[layer] + near_per_token.sum()
            self.totals[layer] = self.totals[layer] + a.numel()
        else:
            m = token_mask.to(zero_per_token.dtype)
            self.zeros[layer] = self.zeros[layer] + (zero_per_token * m).sum()
            if near_per_token is not None:
                self.near_zeros[layer] = self.near_zeros[layer] + (near_per_token * m).sum()
            self.totals[layer] = self.totals[layer] + m.sum() * a.shape[-1]

    def merge_counts(self) -> torch.Tensor:
        """[3, layers] tensor (zeros, near-zeros, totals), e.g. for an all-reduce across ranks."""
        rows = [self.zeros, self.near_zeros, self.totals]
        device = next((t.device for row in rows for t in row if isinstance(t, torch.Tensor)), torch.device("cpu"))
        return torch.stack(
            [torch.stack([torch.as_tensor(v, device=device, dtype=torch.float64) for v in row]) for row in rows]
        )

    def summary(self, counts: torch.Tensor | None = None) -> dict:
        """{'sparsity': mean, 'per_layer': [...], and for near-zero: 'near_zero', 'near_zero_per_layer'}."""
        counts = self.merge_counts() if counts is None else counts
        zeros, near, totals = counts.cpu().tolist()
        if sum(totals) == 0:
            return {}
        per_layer = [z / t if t else 0.0 for z, t in zip(zeros, totals)]
        out = {"sparsity": sum(zeros) / sum(totals), "per_layer": per_layer, "activations_counted": int(sum(totals))}
        if self.near_zero_threshold:
            out["near_zero"] = sum(near) / sum(totals)
            out["near_zero_per_layer"] = [n / t if t else 0.0 for n, t in zip(near, totals)]
            out["near_zero_threshold"] = self.near_zero_threshold
        return out


class ActivationRecorder:
    """Receives activations from SparseMLPs while open (between `open` and `close`).

    `close()` is called after the forward pass, so the recomputation done by gradient
    checkpointing inside backward is not counted twice.
    """

    def __init__(self, num_layers: int, regularizer: Regularizer | None, near_zero_threshold: float | None):
        self.num_layers = num_layers
        self.regularizer = regularizer
        self.near_zero_threshold = near_zero_threshold
        self.stats = SparsityStats(num_layers, near_zero_threshold)
        self.reg_terms: list[torch.Tensor] = []
        self.reg_with_grad = True  # set by the regularization: build the term's graph only when it is used
        self.token_mask: torch.Tensor | None = None
        self.is_open = False
        self.consumers: list = []  # e.g. the PredictorBank: observe_mlp(layer, a, x, token_mask)

    @classmethod
    def for_mlps(cls, mlps: list, regularizer: Regularizer | None, near_zero_threshold: float) -> ActivationRecorder:
        """Near-zero counting is on only for activations without exact zeros (SiLU), so the two kinds of
        sparsity are never mixed."""
        exact = mlps[0].activation.exact_zeros
        return cls(len(mlps), regularizer, None if exact else near_zero_threshold)

    def open(self, attention_mask: torch.Tensor | None) -> None:
        # An all-ones mask (packed data) needs no masking: skip the per-token multiply.
        self.token_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        self.reg_terms = []
        self.is_open = True

    def close(self) -> None:
        self.is_open = False

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor,
               gate: torch.Tensor | None = None) -> None:
        if not self.is_open:
            return
        self.stats.add(layer, activation, self.token_mask)
        if self.regularizer is not None:
            if self.reg_with_grad and torch.is_grad_enabled():
                self.reg_terms.append(self.regularizer(activation, self.token_mask))
            else:
                with torch.no_grad():
                    self.reg_terms.append(self.regularizer(activation.detach(), self.token_mask))
        for consumer in self.consumers:
            consumer.observe_mlp(layer, activation, mlp_input, self.token_mask)

    def regularizer_loss(self) -> torch.Tensor | None:
        """Mean over layers of this forward's regularizer terms."""
        if not self.reg_terms:
            return None
        return torch.stack([t.float() for t in self.reg_terms]).mean()

    def reset_stats(self) -> SparsityStats:
        """Return the stats accumulated so far and start new ones."""
        stats, self.stats = self.stats, SparsityStats(self.num_layers, self.near_zero_threshold)
        return stats


def attach_recorder(mlps: list, regularizer: Regularizer | None, near_zero_threshold: float) -> ActivationRecorder:
    """A recorder fed by every SparseMLP in `mlps` for the whole run (their persistent sink)."""
    recorder = ActivationRecorder.for_mlps(mlps, regularizer, near_zero_threshold)
    for mlp in mlps:
        mlp.sink = recorder
    return recorder
