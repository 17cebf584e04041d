"""Per-layer predictor thresholds calibrated to a recall or mass-recall target.

One global threshold (PowerInfer's `sparse_threshold`, DejaVu's fixed top-K) keeps too much in easy layers and too
little in hard ones. Here each layer gets the highest logit threshold whose kept neurons still reach the target on
calibration tokens: `recall` counts active neurons alike, `mass_recall` weighs each by its contribution to the MLP
output (|a_j| * ||W_down[:, j]||), so neurons that matter are the ones kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from sparsetune.predictors.bank import PredictorBank
from sparsetune.predictors.labels import neuron_labels
from sparsetune.surgery.sparse_mlp import measuring_pass

Target = Literal["recall", "mass_recall"]
POSITIVES_PER_BATCH = 1 << 16  # sampled per layer and batch: a quantile accurate to well under 1%
NOTHING_ACTIVE = 1e30  # a layer with no active neuron on the calibration tokens keeps none (finite: valid JSON)


class _Collector:
    """A sink recording, per neuron predictor, the logits and importance of the truly active neurons."""

    def __init__(self, bank: PredictorBank, seed: int):
        self.bank = bank
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.pending: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate=None) -> None:
        bank = self.bank
        if bank.cfg.lookahead:  # predictor layer-1 reads layer-1's input and predicts this layer's neurons
            source, self.pending = self.pending, mlp_input
            if source is None:
                return
            idx = layer - 1
        else:
            source, idx = bank.features(layer, mlp_input), layer
        labels = neuron_labels(activation, bank.exact_zeros, bank.cfg.silu_active_fraction)
        logits = bank.neurons[idx](source)[labels].float().cpu()
        weights = bank.neuron_importance(layer, activation)[labels].cpu()
        if logits.numel() > POSITIVES_PER_BATCH:
            pick = torch.randint(logits.numel(), (POSITIVES_PER_BATCH,), generator=self.generator)
            logits, weights = logits[pick], weights[pick]
        self.logits.setdefault(idx, []).append(logits)
        self.weights.setdefault(idx, []).append(weights)


def threshold_for_target(logits: torch.Tensor, weights: torch.Tensor, target: float) -> float:
    """The highest threshold t such that the positives with logit >= t carry at least `target` of the weight."""
    order = logits.argsort(descending=True)
    covered = weights[order].double().cumsum(0)
    total = covered[-1].item() if covered.numel() else 0.0
    if total <= 0:
        return NOTHING_ACTIVE
    k = int(torch.searchsorted(covered, torch.tensor(target * total, dtype=torch.float64)).item())
    return float(logits[order][min(k, logits.numel() - 1)])


@torch.no_grad()
def calibrate_thresholds(model, bank: PredictorBank, batches: Iterable[dict], device, target: float,
                         kind: Target = "mass_recall", seed: int = 0) -> list[float]:
    """Set (and return) the bank's per-layer logit thresholds so that each layer reaches `target` `kind` on the
    real tokens of `batches`. Identical on every rank given identical batches."""
    bank_training = bank.training
    bank.bind(model)
    bank.eval()
    collector = _Collector(bank, seed)
    try:
        tokens = measuring_pass(model, batches, device, collector)
    finally:
        bank.train(bank_training)
    thresholds = []
    for idx in range(bank.num_neuron_predictors):
        logits = torch.cat(collector.logits.get(idx, [torch.zeros(0)]))
        weights = torch.cat(collector.weights.get(idx, [torch.zeros(0)]))
        if kind == "recall":
            weights = torch.ones_like(weights)
        thresholds.append(threshold_for_target(logits, weights, target))
    bank.layer_thresholds = thresholds
    bank.calibration = {"target": target, "kind": kind, "tokens": tokens}
    return thresholds
