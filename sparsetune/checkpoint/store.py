"""Checkpoint folders in a run: atomic writes, a verified completeness marker, a `latest` pointer, lineage, pruning.

Layout:  <output_dir>/checkpoints/step-00000120/{...files..., checkpoint.json}
         <output_dir>/checkpoints/latest      (text: the newest checkpoint of the run's lineage)
         <output_dir>/checkpoints/abandoned/  (checkpoints set aside by a resume from an older one; never deleted)

A checkpoint is written into a hidden temporary folder, every file is flushed to disk and hashed, the marker
`checkpoint.json` (each file's size and sha256) is written last, the folder is renamed into place, and only then
does `latest` move. A folder without a valid marker, or whose files do not match it, is never used.

`latest` is the truth for "newest": step folders newer than it are not part of the run (a resume from an older
checkpoint, or a crash between the rename and the pointer update) and are moved aside, never deleted.

The marker also records the checkpoint layout (`LAYOUT`: which files a checkpoint holds and what they mean,
checkpoint/state.py). A checkpoint of another layout, or of none, is refused in one line by every command that
reads one (`check_layout`): resume, export, eval, analyze. Change `LAYOUT` whenever a checkpoint's files change
meaning; nothing reads an older layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from sparsetune import __version__
from sparsetune.checkpoint.storage import ordinary_file_modes
from sparsetune.console import notice
from sparsetune.errors import SparsetuneError

MARKER = "checkpoint.json"
LAYOUT = 1  # the checkpoint layout this sparsetune writes and reads (recorded in MARKER)
LATEST = "latest"
ABANDONED = "abandoned"
_NAME = re.compile(r"^step-(\d{8,})$")  # zero-padded to 8 digits; longer past 10^8 steps
_UNFINISHED = re.compile(r"^\.(tmp|del|old)-step-\d{8,}$")  # exactly the names sparsetune's writes use


def step_of(folder: Path) -> int:
    return int(_NAME.match(folder.name).group(1))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_and_hash(root: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Flush every file of `root` to disk; (sizes, sha256) by relative path."""
    sizes, hashes = {}, {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            with open(path, "rb") as f:
                os.fsync(f.fileno())
                hashes[rel] = hashlib.file_digest(f, "sha256").hexdigest()
            sizes[rel] = path.stat().st_size
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return sizes, hashes


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` whole: a reader sees the old content or the new, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checkpoint_problem(folder: Path, verify: bool = True) -> str | None:
    """Why `folder` is not a usable checkpoint, or None when it is complete.

    Sizes are always checked; with `verify`, every file's sha256 too. The layout is `check_layout`'s."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"{folder}: no {MARKER} (the checkpoint was not finished)"
    try:
        meta = json.loads(marker.read_text())
        files, hashes = dict(meta["files"]), dict(meta["sha256"])
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return f"{folder}: {MARKER} is unreadable"
    for rel, size in files.items():
        file = folder / rel
        if not file.is_file():
            return f"{folder}: {rel} is missing"
        if file.stat().st_size != size:
            return f"{folder}: {rel} has {file.stat().st_size} bytes, expected {size}"
    if verify:
        for rel, digest in hashes.items():
            if _sha256(folder / rel) != digest:
                return f"{folder}: {rel} does not match the sha256 recorded when it was written (the file changed)"
    return None


class CheckpointStore:
    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / "checkpoints"

    @staticmethod
    def name_for(step: int) -> str:
        return f"step-{step:08d}"

    def folders(self) -> list[Path]:
        """All step folders directly under checkpoints/, oldest first (complete or not, in the lineage or not)."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=step_of)

    def latest_name(self) -> str | None:
        """The folder `latest` names, when it holds a well-formed name."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except OSError:
            return None
        return name if _NAME.match(name) else None

    def lineage(self) -> list[Path]:
        """Step folders up to and including `latest` (all of them when there is no pointer), oldest first."""
        latest = self.latest_name()
        folders = self.folders()
        if latest is None:
            return folders
        last = int(_NAME.match(latest).group(1))
        return [f for f in folders if step_of(f) <= last]

    def latest_complete(self, report: Callable[[str], None] | None = None, verify: bool = True) -> Path | None:
        """Newest usable checkpoint of the lineage; damaged ones are reported (one line each) and skipped."""
        for folder in reversed(self.lineage()):
            problem = checkpoint_problem(folder, verify=verify)
            if problem is None:
                return folder
            if report is not None:
                report(f"skipping damaged checkpoint {problem}")
        return None

    def set_aside_after(self, step: int, report: Callable[[str], None]) -> list[Path]:
        """Move every step folder newer than `step` into checkpoints/abandoned/ (a resume from `step` starts a new
        lineage there); nothing is deleted. Returns the new locations."""
        newer = [f for f in self.folders() if step_of(f) > step]
        if not newer:
            return []
        aside = self.root / ABANDONED
        aside.mkdir(exist_ok=True)
        moved = []
        for folder in newer:
            target, n = aside / folder.name, 1
            while target.exists():
                target, n = aside / f"{folder.name}.{n}", n + 1
            os.replace(folder, target)
            moved.append(target)
        report(f"resume from step {step}: moved {len(moved)} newer checkpoint(s) aside, not deleted: "
               f"{', '.join(str(m) for m in moved)}")
        return moved

    def point_latest_at(self, folder: Path) -> None:
        write_atomic(self.root / LATEST, folder.name + "\n")

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

    def discard(self, step: int) -> None:
        """Remove the unfinished temporary folder of `step` (after a failed write, to give the space back)."""
        shutil.rmtree(self.tmp_for(step), ignore_errors=True)

    def commit(self, step: int, keep: int, meta: dict | None = None) -> Path:
        """Flush and hash, write the marker last, rename into place, move `latest`, prune. Main process only."""
        tmp, final = self.tmp_for(step), self.root / self.name_for(step)
        ordinary_file_modes(tmp)  # safetensors leaves its files 0600
        sizes, hashes = _fsync_and_hash(tmp)
        write_atomic(tmp / MARKER, json.dumps({"step": step, "complete": True, "layout": LAYOUT, "files": sizes,
                                               "sha256": hashes, **(meta or {})}, indent=1))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            old = self.root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        self.point_latest_at(final)
        self.prune(keep)
        return final

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints of the lineage; abandoned/ and damaged folders stay."""
        complete = [f for f in self.lineage() if checkpoint_problem(f, verify=False) is None]
        for folder in complete[:-keep] if keep > 0 else []:
            # renamed first: a kill during the deletion leaves a `.del-` folder, never a half-deleted checkpoint
            doomed = self.root / f".del-{folder.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for stale in self._unfinished():
            shutil.rmtree(stale, ignore_errors=True)

    def _unfinished(self) -> list[Path]:
        """Folders a stopped write leaves: `.tmp-` (a checkpoint being written), `.del-` (one being pruned),
        `.old-` (one being replaced). Only the run's own, since the run folder has one writer (its lock)."""
        return [p for p in self.root.iterdir() if _UNFINISHED.match(p.name)] if self.root.is_dir() else []

    def clean_debris(self, report: Callable[[str], None]) -> None:
        """What killed runs left (main process, under the run's lock, before a run writes anything): unfinished
        `.tmp-` checkpoints and `.del-` folders of an interrupted pruning are removed; a checkpoint a kill left as
        `.old-` while it was being replaced is put back when its step folder is missing."""
        if not self.root.is_dir():
            return
        removed, restored = [], []
        for old in sorted(p for p in self._unfinished() if p.name.startswith(".old-")):
            final = self.root / old.name.removeprefix(".old-")
            if not final.exists() and checkpoint_problem(old, verify=False) is None:
                os.replace(old, final)
                restored.append(final.name)
        for stale in self._unfinished():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale.name)
        for name in self.root.glob(f".{LATEST}.tmp*"):
            name.unlink(missing_ok=True)
        if restored:
            report(f"put back checkpoint(s) {', '.join(restored)} that a stopped run left while replacing them")
        if removed:
            report(f"removed {len(removed)} unfinished folder(s) a stopped run left in {self.root}: "
                   f"{', '.join(sorted(removed)[:4])}" + (" ..." if len(removed) > 4 else ""))


def check_layout(folder: Path) -> None:
    """Refuse, in one line, a complete checkpoint whose marker records another layout than `LAYOUT`, or none."""
    marker = Path(folder) / MARKER
    found = json.loads(marker.read_text()).get("layout")
    if found != LAYOUT:
        raise SparsetuneError(f"{marker} records {'no checkpoint layout' if found is None else f'layout {found}'}; "
                              f"sparsetune {__version__} reads checkpoint layout {LAYOUT} only: continue or export "
                              "it with the sparsetune that wrote it, or start a new run")


def resolve_checkpoint(path: Path) -> Path:
    """A run's output_dir (-> its newest usable checkpoint) or one checkpoint folder, verified (complete, of this
    layout)."""
    path = Path(path)
    if not path.exists():
        raise SparsetuneError(f"no such run or checkpoint folder: {path}")
    if (path / MARKER).exists() or _NAME.match(path.name):
        problem = checkpoint_problem(path)
        if problem:
            raise SparsetuneError(f"checkpoint is not usable: {problem}")
        check_layout(path)
        return path
    store = CheckpointStore(path)
    found = store.latest_complete(report=notice)
    if found is None and not store.folders() and (path / "sparsetune-run.json").is_file():
        raise SparsetuneError(f"{path} is a sparsetune run with no checkpoint yet (it stopped before its first one); "
                              "continue it with `sparsetune train RECIPE output_dir=... --resume`")
    if found is None:
        raise SparsetuneError(f"{path} holds no usable checkpoint (expected {path}/checkpoints/step-*/{MARKER})")
    check_layout(found)
    return found
