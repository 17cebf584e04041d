"""A checkpoint as an ordered list of parts: saving and restoring walk the same list, so they cannot drift."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CheckpointPart:
    """`save(folder)` writes this part into the checkpoint's temporary folder; `load(folder)` restores it at
    resume (None: nothing to restore, e.g. the tokenizer, or the recipe that resume checks separately).
    `every_rank`: called on every process (collective, or a per-rank file); otherwise on the main process only.
    Resume loads on every rank."""

    name: str
    save: Callable[[Path], None]
    load: Callable[[Path], None] | None = None
    every_rank: bool = False
