"""Held-out perplexity and activation sparsity from the same forward passes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from sparsetune.sparsity.recorder import ActivationRecorder


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], recorder: ActivationRecorder | None, device,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """{'loss', 'perplexity', 'tokens', 'sparsity', 'per_layer', ...} over real (label != -100) tokens."""
    was_training = model.training
    model.eval()
    if recorder is not None:
        recorder.reset_stats()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch.get("attention_mask")
        record = recorder is not None and bool((batch["labels"] != -100).any())  # not for a padding batch
        if record:
            recorder.open(mask)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        if record:
            recorder.close()
        labels = batch["labels"][:, 1:]
        if mask is not None:
            labels = labels.masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        nll += loss.double()
        count += (labels != -100).sum()
    totals = torch.stack([nll, count])
    stats = recorder.reset_stats() if recorder is not None else None
    counts = stats.merge_counts() if stats is not None else None
    if all_reduce is not None:
        totals = all_reduce(totals)
        counts = all_reduce(counts) if counts is not None else None
    model.train(was_training)
    mean_loss = (totals[0] / totals[1].clamp_min(1)).item()
    out = {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 700.0)), "tokens": int(totals[1].item())}
    if stats is not None:
        out.update(stats.summary(counts))
    return out


def held_out_data(data_cfg, tokenizer):
    """The held-out split of `data_cfg`, tokenized and packed."""
    from sparsetune.data.text_datasets import load_text_splits, pack

    _, held = load_text_splits(data_cfg)
    return pack(held, tokenizer, data_cfg.text_field, data_cfg.seq_len, "held-out data")


def evaluate_held_out(model, data, batch_size: int, batches: int, near_zero_threshold: float,
                      device: torch.device | None = None) -> dict:
    """Measure `model` (which has SparseMLPs, already on `device`; default CPU) on packed held-out `data`."""
    from sparsetune.data.batches import eval_batches
    from sparsetune.errors import SparsetuneError
    from sparsetune.sparsity.recorder import ActivationRecorder
    from sparsetune.surgery.sparse_mlp import patched_mlps, sparse_mlps

    if batch_size < 1 or batches < 1:  # a figure from no tokens (perplexity 1.0) is never reported
        raise SparsetuneError(f"held-out evaluation needs at least 1 batch of at least 1 sequence, got {batches} "
                              f"batch(es) of {batch_size}")
    mlps = sparse_mlps(model)
    recorder = ActivationRecorder.for_mlps(mlps, None, near_zero_threshold)
    with patched_mlps(model, sink=recorder):
        result = evaluate(model, eval_batches(data, batch_size, batches), recorder, device or torch.device("cpu"))
    if result["tokens"] == 0:
        raise SparsetuneError("the held-out data gave no token to evaluate (every row is padding or shorter than "
                              "2 tokens); give more held-out text or a shorter --seq-len")
    return result
