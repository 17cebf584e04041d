"""A deterministic, position-addressed stream of training batches.

The order of sequences is a seeded permutation per epoch, so the batch at any point of
training is a pure function of (seed, position): resuming only needs the position, and
ranks take disjoint slices of each global micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsetune.data.text_datasets import PackedData


class BatchStream:
    """Yields micro-batches of `micro_batch_size` sequences for one rank of `world_size`.

    `position` counts sequences consumed globally (all ranks), so it is the same on every rank.
    """

    def __init__(self, data: PackedData, micro_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, position: int = 0):
        self.data = data
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = position
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epoch_cache = (epoch, rng.permutation(len(self.data)))
        return self._epoch_cache[1]

    def _index(self, global_pos: int) -> int:
        epoch, offset = divmod(global_pos, len(self.data))
        return int(self._order(epoch)[offset])

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = self.position + self.rank * self.micro_batch_size
        rows = [self._index(start + i) for i in range(self.micro_batch_size)]
        self.position += self.micro_batch_size * self.world_size
        ids = torch.from_numpy(self.data.ids[rows].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def _eval_starts(rows: int, micro_batch_size: int, max_batches: int, rank: int, world_size: int) -> range:
    n = min(rows, micro_batch_size * max_batches)
    return range(rank * micro_batch_size, n, micro_batch_size * world_size)


def eval_batch_counts(rows: int, micro_batch_size: int, max_batches: int, world_size: int) -> list[int]:
    """How many held-out batches each rank runs (they differ when the held-out set is short)."""
    return [len(_eval_starts(rows, micro_batch_size, max_batches, r, world_size)) for r in range(world_size)]


def eval_batches(data: PackedData, micro_batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1):
    """The first max_batches held-out micro-batches, in order (the same every evaluation)."""
    n = min(len(data), micro_batch_size * max_batches)
    for start in _eval_starts(len(data), micro_batch_size, max_batches, rank, world_size):
        ids = torch.from_numpy(data.ids[start : min(start + micro_batch_size, n)].astype(np.int64))
        yield {"input_ids": ids, "labels": ids.clone()}


def padding_batch(data: PackedData) -> dict[str, torch.Tensor]:
    """A one-sequence batch with no real labels: a forward that counts for nothing (perplexity, sparsity and
    predictor figures skip it), so that every rank runs the same number of collective forwards."""
    ids = torch.from_numpy(data.ids[:1].astype(np.int64))
    return {"input_ids": ids, "labels": torch.full_like(ids, -100)}
