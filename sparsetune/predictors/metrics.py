"""Predictor quality per layer: recall, precision, F1, true and predicted sparsity, and mass recall, from counts.

Plain recall treats every active unit alike, but a missed neuron with a tiny activation costs nothing while a missed
large one costs a lot. Mass recall weighs each active unit by its importance (a neuron's contribution to the MLP
output, |a_j| * ||W_down[:, j]||; a head's output norm): the share of the output's contribution the kept units carry.
"""

from __future__ import annotations

import torch


class ConfusionCounts:
    """Per-layer tp / fp / fn / tn and the kept / total importance of the active units, over real tokens,
    accumulated on the device (no host sync until summary)."""

    def __init__(self, num_layers: int):
        self.counts: list[torch.Tensor | None] = [None] * num_layers

    def add(self, layer: int, predicted: torch.Tensor, actual: torch.Tensor,
            importance: torch.Tensor | None = None) -> None:
        # three reductions; fp, fn and tn follow from them
        hit = predicted & actual
        tp, n_pred, n_true = hit.sum(), predicted.sum(), actual.sum()
        total = torch.tensor(predicted.numel(), device=predicted.device)
        fp, fn = n_pred - tp, n_true - tp
        if importance is None:  # every active unit weighs the same: mass recall = recall
            mass_kept, mass_total = tp, n_true
        else:
            active = importance.double() * actual
            mass_kept, mass_total = (active * predicted).sum(), active.sum()
        row = torch.stack([t.double() for t in (tp, fp, fn, total - tp - fp - fn, mass_kept, mass_total)])
        self.counts[layer] = row if self.counts[layer] is None else self.counts[layer] + row

    def merge_counts(self) -> torch.Tensor | None:
        """[layers, 6] tensor for an all-reduce across ranks (None when nothing was counted)."""
        rows = [c for c in self.counts if c is not None]
        if len(rows) != len(self.counts):
            return None
        return torch.stack(rows)

    @staticmethod
    def summary(counts: torch.Tensor) -> dict:
        per_layer = []
        for tp, fp, fn, tn, mass_kept, mass_total in counts.cpu().tolist():
            total = tp + fp + fn + tn
            recall = tp / (tp + fn) if tp + fn else 1.0
            precision = tp / (tp + fp) if tp + fp else 1.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_layer.append({"recall": recall, "mass_recall": mass_kept / mass_total if mass_total else 1.0,
                              "precision": precision, "f1": f1,
                              "true_sparsity": (fp + tn) / total, "predicted_sparsity": (fn + tn) / total})
        mean = {k: sum(layer[k] for layer in per_layer) / len(per_layer) for k in per_layer[0]}
        return {"mean": mean, "per_layer": per_layer}
