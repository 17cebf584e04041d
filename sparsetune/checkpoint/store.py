"""Checkpoint folders in a run: atomic writes, a completeness marker, a `latest` pointer, pruning.

Layout:  <output_dir>/checkpoints/step-00000120/{...files..., checkpoint.json}
         <output_dir>/checkpoints/latest   (text: the newest complete folder's name)

A checkpoint is written into a hidden temporary folder, every file is flushed to disk,
the marker `checkpoint.json` (with each file's size) is written last, the folder is
renamed into place, and only then does `latest` move. A folder without a valid marker,
or whose files do not match it, is incomplete and never used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

MARKER = "checkpoint.json"
_NAME = re.compile(r"^step-(\d{8})$")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a usable checkpoint, or None when it is complete."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"{folder}: no {MARKER} (the checkpoint was not finished)"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return f"{folder}: {MARKER} is unreadable"
    for rel, size in meta.get("files", {}).items():
        file = folder / rel
        if not file.is_file():
            return f"{folder}: {rel} is missing"
        if file.stat().st_size != size:
            return f"{folder}: {rel} has {file.stat().st_size} bytes, expected {size}"
    return None


class CheckpointStore:
    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / "checkpoints"

    @staticmethod
    def name_for(step: int) -> str:
        return f"step-{step:08d}"

    def folders(self) -> list[Path]:
        """All step folders, oldest first (complete or not)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def latest_complete(self, report: Callable[[str], None] | None = None) -> Path | None:
        """Newest complete checkpoint; incomplete newer ones are reported (one line each) and skipped."""
        for folder in reversed(self.folders()):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            if report is not None:
                report(f"skipping incomplete checkpoint {problem}")
        return None

    def begin(self, step: int) -> Path:
        """Create (empty) the temporary folder checkpoint `step` is written into. Main process only;
        the other ranks compute the same path with `tmp_for(step)` and write their per-rank files there."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_for(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def tmp_for(self, step: int) -> Path:
        return self.root / f".tmp-{self.name_for(step)}"

    def commit(self, step: int, keep: int, meta: dict | None = None) -> Path:
        """Flush, write the marker last, rename into place, move `latest`, prune. Main process only."""
        tmp, final = self.tmp_for(step), self.root / self.name_for(step)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _fsync_tree(tmp)
        _write_atomic(tmp / MARKER, json.dumps({"step": step, "complete": True, "files": files, **(meta or {})}, indent=1))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            old = self.root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_atomic(self.root / "latest", final.name + "\n")
        self.prune(keep)
        return final

    def save(self, step: int, write: Callable[[Path], None], keep: int, meta: dict | None = None) -> Path:
        """Single-process convenience: begin, `write(tmp_folder)`, commit."""
        write(self.begin(step))
        return self.commit(step, keep, meta)

    def prune(self, keep: int) -> None:
        complete = [f for f in self.folders() if checkpoint_problem(f) is None]
        for folder in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(folder, ignore_errors=True)
        for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".old-*")]:
            shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path: Path) -> Path:
    """A run's output_dir (-> its newest complete checkpoint) or one checkpoint folder."""
    from sparsetune.errors import SparsetuneError

    path = Path(path)
    if not path.exists():
        raise SparsetuneError(f"no such run or checkpoint folder: {path}")
    if (path / MARKER).exists() or _NAME.match(path.name):
        problem = checkpoint_problem(path)
        if problem:
            raise SparsetuneError(f"checkpoint is not usable: {problem}")
        return path
    found = CheckpointStore(path).latest_complete(report=lambda m: print(f"sparsetune: {m}", flush=True))
    if found is None:
        raise SparsetuneError(f"{path} holds no complete checkpoint (expected {path}/checkpoints/step-*/{MARKER})")
    return found
