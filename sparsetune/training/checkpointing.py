"""Writing and restoring a run's checkpoint from its ordered list of parts, with every rank in step.

Saving: the main process opens the temporary folder, every part is written (collective parts on every rank, even
after this rank failed a write, so no rank hangs), all ranks agree whether anyone failed, and the main process
commits. A failure (a full disk) stops every rank with one line; the unfinished folder is removed and the previous
checkpoint and `latest` are untouched. Restoring walks the same list.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sparsetune.checkpoint.parts import CheckpointPart
from sparsetune.checkpoint.storage import first_line, storage_failure
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.errors import SparsetuneError


class Checkpointer:
    def __init__(self, store: CheckpointStore, accelerator, any_rank: Callable[[bool], bool], resume_command: str):
        self.store = store
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.any_rank = any_rank
        self.resume_command = resume_command

    def save(self, parts: list[CheckpointPart], step: int, keep: int, meta: dict,
             before_error: Callable[[], None]) -> Path | None:
        """Write checkpoint `step`; the committed folder on the main process (None elsewhere)."""
        # Any exception of a write is caught (torch reports a full disk as RuntimeError, safetensors as
        # SafetensorError), so the unfinished folder is always removed and every rank stops together.
        error: Exception | None = None
        try:
            if self.is_main:
                self.store.begin(step)
        except Exception as exc:  # noqa: BLE001
            error = exc
        self.accelerator.wait_for_everyone()
        tmp = self.store.tmp_for(step)
        for part in parts:
            if not (part.every_rank or self.is_main) or (error is not None and not part.every_rank):
                continue
            try:
                part.save(tmp)  # a collective part runs on every rank even after this rank failed a write
            except Exception as exc:  # noqa: BLE001
                error = error or exc
        self._stop_if_failed(error, step, before_error)
        path = None
        try:
            if self.is_main:
                path = self.store.commit(step, keep=keep, meta=meta)
        except Exception as exc:  # noqa: BLE001
            error = exc
        self._stop_if_failed(error, step, before_error)
        self.accelerator.wait_for_everyone()
        return path

    def _stop_if_failed(self, error: Exception | None, step: int, before_error: Callable[[], None]) -> None:
        if not self.any_rank(error is not None):
            return
        if self.is_main:
            self.store.discard(step)
        previous = self.store.latest_name() or "none yet"
        storage = storage_failure(error, self.store.tmp_for(step)) if error is not None else None
        what = (storage or first_line(error) if error is not None else "another process failed to write its part")
        fix = "free space and continue" if storage and "space" in storage.lower() else "fix that and continue"
        before_error()
        raise SparsetuneError(
            f"could not write checkpoint step {step} in {self.store.root}: {what}; the previous checkpoint "
            f"({previous}) and checkpoints/latest are intact (the unfinished copy was removed); {fix} with: "
            f"{self.resume_command} --resume")

    @staticmethod
    def restore(parts: list[CheckpointPart], ckpt: Path) -> None:
        """Every part, in order. A file that cannot be read (damaged in a way its marker could not tell) stops
        with one line."""
        try:
            for part in parts:
                if part.load is not None:
                    part.load(ckpt)
        except SparsetuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the library raised, the cause is the file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise SparsetuneError(f"checkpoint {ckpt} could not be read ({type(exc).__name__}: {first}); nothing was "
                                  "changed; resume from an earlier checkpoint with --resume CHECKPOINT") from None
