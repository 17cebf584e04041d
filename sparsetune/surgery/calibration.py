"""Calibrate training-free thresholds (CATS) on data: per layer, the |SiLU(gate)| quantile that
zeroes `target_sparsity` of the values."""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from sparsetune.surgery.activations import CATS
from sparsetune.surgery.relufy import sparse_mlps

# Values kept per layer per batch: enough for a quantile accurate to ~0.1%, small enough for 7B layers.
SAMPLE_PER_BATCH = 1 << 17


def needs_calibration(model) -> bool:
    return any(isinstance(m.activation, CATS) and m.activation.threshold != m.activation.threshold
               for m in sparse_mlps(model))


@torch.no_grad()
def calibrate_cats(model, batches: Iterable[dict], device, total: int | None = None, seed: int = 0,
                   progress: bool = True) -> list[float]:
    """Set (and return) each CATS layer's threshold so that its target fraction of |SiLU(gate)| over the
    real tokens of `batches` falls below it. Identical on every rank given identical batches."""
    mlps = [m for m in sparse_mlps(model) if isinstance(m.activation, CATS)]
    samples: dict[int, list[torch.Tensor]] = {id(m.activation): [] for m in mlps}
    generator = torch.Generator().manual_seed(seed)
    mask_holder: dict = {}

    def collect(act: CATS, values: torch.Tensor) -> None:
        mask = mask_holder.get("mask")
        flat = values[mask.bool()] if mask is not None else values.reshape(-1, values.shape[-1])
        flat = flat.reshape(-1).float().cpu()
        if flat.numel() > SAMPLE_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (SAMPLE_PER_BATCH,), generator=generator)]
        samples[id(act)].append(flat)

    was_training = model.training
    model.eval()
    for m in mlps:
        m.activation.threshold = float("nan")  # dense SiLU while measuring
        m.activation.collector = collect
    try:
        for batch in tqdm(batches, total=total, desc="calibrating CATS thresholds", unit="batch",
                          disable=not progress):
            mask = batch.get("attention_mask")
            mask_holder["mask"] = mask.to(device) if mask is not None else None
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask_holder["mask"])
    finally:
        for m in mlps:
            m.activation.collector = None
        model.train(was_training)
    thresholds = []
    for m in mlps:
        pooled = torch.cat(samples[id(m.activation)])
        k = max(1, min(pooled.numel(), round(m.activation.target_sparsity * pooled.numel())))
        m.activation.threshold = float(pooled.kthvalue(k).values)
        thresholds.append(m.activation.threshold)
    return thresholds
