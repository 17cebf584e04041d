"""Which folders sparsetune may write into or delete: only run and export folders it made itself.

A run folder carries `sparsetune-run.json`, written when the run creates it; an export folder carries
`sparsetune.json` (with the list of files the export wrote). `--overwrite` removes only what sparsetune wrote
there and stops with one line on a folder it did not make; `--resume` never deletes anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from sparsetune import __version__, console
from sparsetune.checkpoint.locks import RUN_LOCK
from sparsetune.checkpoint.storage import ordinary_file_modes
from sparsetune.errors import SparsetuneError

RUN_MARKER = "sparsetune-run.json"
# Everything a run writes at its top level; --overwrite removes these and nothing else.
# The marker comes last: a kill while clearing leaves a marked folder that --overwrite can clear again.
RUN_ENTRIES = ("recipe.yaml", "recipe-history.jsonl", "metrics.jsonl", "tradeoff.csv", "tradeoff.png", "checkpoints",
               "wandb", "eval.json", "eval-sweep.json", "eval-sweep.png", "sweep.json", "sweep.png",
               RUN_MARKER)
EXPORT_MARKER = "sparsetune.json"
# What `sparsetune eval` writes into a run or an export by default (cli._eval_json_path, evaluation/sweep.py).
EVAL_FILES = ("eval.json", "eval-sweep.json", "eval-sweep.png")


class RunFolder(Enum):
    ABSENT = "absent"
    EMPTY = "empty"
    RUN = "run"  # made by sparsetune (marker present)
    FOREIGN = "foreign"  # holds files sparsetune did not write (a run folder without its marker among them)


def _listing(entries: list[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(entries)[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def inspect_run_folder(run_dir: Path) -> RunFolder:
    if not run_dir.exists():
        return RunFolder.ABSENT
    if not run_dir.is_dir():
        raise SparsetuneError(f"output_dir {run_dir} exists and is not a folder")
    entries = [p.name for p in run_dir.iterdir() if p.name != RUN_LOCK]  # the lock alone: left by a kill
    if not entries:
        return RunFolder.EMPTY
    return RunFolder.RUN if RUN_MARKER in entries else RunFolder.FOREIGN


def resolve_link(path: Path, what: str, notice: Callable[[str], None] | None = None) -> Path:
    """A symlinked output folder is judged and written by what it points to (a dangling link: a new folder
    there). The path as given otherwise."""
    path = Path(path)
    check_name(path, what)  # before any system call: a NUL byte or an over-long name is one line
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if notice is not None:
        notice(f"{what} {path} is a symlink; using its target {target}"
               + ("" if target.exists() else " (absent: it will be created)"))
    return target


def foreign_error(run_dir: Path, why: str) -> SparsetuneError:
    entries = [p.name for p in run_dir.iterdir() if p.name != RUN_LOCK]
    return SparsetuneError(f"output_dir {run_dir} {why}: it holds files sparsetune did not create "
                           f"({_listing(entries)}) and no {RUN_MARKER}; choose a new or empty output_dir")


def mark_run(run_dir: Path, command: str) -> bool:
    """Claim a run folder sparsetune created (or resumes), so a later --overwrite may clear it. True when this call
    wrote the marker."""
    marker = run_dir / RUN_MARKER
    if marker.exists():
        return False
    marker.write_text(json.dumps({"created_by": f"sparsetune {__version__}", "command": command,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    return True


def clear_run(run_dir: Path, notice: Callable[[str], None]) -> None:
    """--overwrite: remove what a sparsetune run wrote into `run_dir` and keep everything else."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    kept = [p.name for p in run_dir.iterdir() if p.name != RUN_LOCK]
    if kept:
        notice(f"--overwrite: removed the previous run from {run_dir}; kept what the run did not write: "
               f"{_listing(kept)}")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_target(out: Path, ckpt: Path, overwrite: bool) -> None:
    """Refuse an export folder that would destroy the checkpoint being exported or files sparsetune did not
    write. The run's own folder may hold an export (RUN/export) as long as it is outside checkpoints/."""
    out_r, ckpt_r = out.resolve(), ckpt.resolve()
    run_r = ckpt_r.parent.parent if ckpt_r.parent.name == "checkpoints" else ckpt_r
    if _inside(ckpt_r, out_r) or _inside(run_r, out_r):
        raise SparsetuneError(f"--out {out} contains the run being exported ({run_r}); choose a folder outside it")
    if _inside(out_r, ckpt_r) or _inside(out_r, run_r / "checkpoints"):
        raise SparsetuneError(f"--out {out} is inside the run's checkpoints ({run_r / 'checkpoints'}); "
                              "choose a folder outside checkpoints/")
    if out.exists() and not out.is_dir():
        raise SparsetuneError(f"--out {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise SparsetuneError(f"export folder {out} exists and is not empty; pass --overwrite to replace it")
    marker = out / EXPORT_MARKER
    if not marker.is_file():
        raise SparsetuneError(f"--overwrite: {out} is not a sparsetune export (no {EXPORT_MARKER}); refusing to "
                              "delete it; choose another --out")
    try:
        written = set(json.loads(marker.read_text()).get("files") or [])
    except (OSError, ValueError, AttributeError):
        raise SparsetuneError(f"--overwrite: {marker} is unreadable; refusing to delete {out}") from None
    # besides what the export wrote, what `sparsetune eval EXPORT` writes there by default (kept by replace_folder)
    evaluated = {*EVAL_FILES, *map(previous_name, EVAL_FILES)}
    unknown = [p.name for p in out.iterdir() if p.name not in written | {EXPORT_MARKER} | evaluated]
    if not written or unknown:
        raise SparsetuneError(f"--overwrite: {out} holds files the previous export did not write "
                              f"({_listing(unknown) if unknown else 'no file list in ' + EXPORT_MARKER}); "
                              "move them or choose another --out")


def previous_name(name: str) -> str:
    """What an evaluation file of a replaced export is called in the export replacing it (eval.previous.json)."""
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.previous.{suffix}"


def keep_previous_evaluation(out: Path, tmp: Path) -> str | None:
    """Copy what `sparsetune eval` wrote into the export `out` (eval.json with its --tasks scores, the sweep) into
    its replacement `tmp` as eval.previous.json etc.: it measured the weights being replaced, so it is kept beside
    the new ones under a name that says so, never silently lost. When `out` holds no fresh evaluation, the previous
    one it carries is carried on. Returns the notice saying what was kept and what older result it replaced."""
    fresh = [n for n in EVAL_FILES if (out / n).is_file()]
    moves = ([(n, previous_name(n)) for n in fresh] if fresh else
             [(previous_name(n), previous_name(n)) for n in EVAL_FILES if (out / previous_name(n)).is_file()])
    for src, dst in moves:
        shutil.copy2(out / src, tmp / dst)
    if not moves:
        return None
    if not fresh:
        return (f"--overwrite: kept {_listing([d for _, d in moves])}, the evaluation of an earlier export (not of "
                "these weights)")
    dropped = [previous_name(n) for n in EVAL_FILES if (out / previous_name(n)).is_file()]
    return (f"--overwrite: kept the previous export's evaluation as {', '.join(f'{s} -> {d}' for s, d in moves)} "
            "(it measured the replaced weights, not these)"
            + (f"; the older {_listing(dropped)} it replaces is removed" if dropped else ""))


def replace_folder(tmp: Path, out: Path, notice: Callable[[str], None] | None = None) -> None:
    """Put the finished `tmp` folder at `out`, replacing a previous export whole (checked by check_export_target),
    except its evaluation, kept as eval.previous.json (keep_previous_evaluation). Every file gets the mode the
    umask gives (storage.ordinary_file_modes). A kill between the two renames leaves the previous export as
    `.<name>.old<pid>`: the next export into `out` puts it back first (clean_export_debris)."""
    notice = notice or console.notice
    out.parent.mkdir(parents=True, exist_ok=True)
    ordinary_file_modes(tmp)
    if out.exists():
        kept = keep_previous_evaluation(out, tmp)
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
        if kept:
            notice(kept)
    else:
        os.replace(tmp, out)


def clean_export_debris(out: Path, notice: Callable[[str], None]) -> None:
    """Before an export into `out` (under its lock): restore a previous export a kill left in `.<name>.old*` when
    `out` is missing, and remove the unfinished `.<name>.tmp*` copies of killed exports."""
    if not out.parent.is_dir():
        return
    # exactly the names replace_folder and the exporter use (.<name>.old<pid>, .<name>.tmp<pid>), nothing else
    ours = re.compile(rf"^\.{re.escape(out.name)}\.(old|tmp)\d+$")
    found = sorted(p for p in out.parent.iterdir() if ours.match(p.name))
    olds = [p for p in found if p.name.startswith(f".{out.name}.old")]
    if olds and not out.exists():
        os.replace(olds[0], out)
        notice(f"export: restored the previous export {out} from {olds[0].name} (an earlier export was stopped "
               "while replacing it)")
        olds = olds[1:]
    debris = [*olds, *(p for p in found if p.name.startswith(f".{out.name}.tmp"))]
    for path in debris:
        shutil.rmtree(path, ignore_errors=True)
    if debris:
        notice(f"export: removed {len(debris)} unfinished copy(ies) left by a stopped export: "
               f"{_listing([d.name for d in debris])}")


def made_by_sparsetune(folder: Path) -> bool:
    """A run folder or an export: where eval and analyze may write their results by default."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / RUN_MARKER).is_file() or (folder / EXPORT_MARKER).is_file())


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be created in `folder`, or None when they can."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    return "is on a read-only filesystem" if os.statvfs(folder).f_flag & os.ST_RDONLY else "is not writable"


def _writable_parent(path: Path, what: str) -> None:
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("/"))
    if not parent.is_dir():
        raise SparsetuneError(f"{what} {path}: {parent} is not a folder")
    reason = _unwritable(parent)
    if reason:
        raise SparsetuneError(f"{what} {path}: {parent} {reason}; choose a writable place")


def check_output_file(path: Path, what: str) -> Path:
    """Before any computation: `path` can be written as a file (not a folder, a writable place, a valid name)."""
    path = resolve_link(Path(path), what)
    if path.is_dir():
        raise SparsetuneError(f"{what} {path} is a folder; name a file, e.g. {path / 'eval.json'}")
    target = path if path.exists() else path.parent
    if path.exists() and not os.access(target, os.W_OK):
        raise SparsetuneError(f"{what} {path} is not writable")
    _writable_parent(path, what)
    return path


def check_output_folder(path: Path, what: str) -> Path:
    """Before any computation: `path` can be a folder of results (absent or a folder, in a writable place)."""
    path = resolve_link(Path(path), what)
    if path.exists() and not path.is_dir():
        raise SparsetuneError(f"{what} {path} exists and is not a folder")
    if path.is_dir():
        reason = _unwritable(path)
        if reason:
            raise SparsetuneError(f"{what} {path} {reason}")
    else:
        _writable_parent(path, what)
    return path


def check_name(path: Path, what: str) -> None:
    text = str(path)
    if "\x00" in text:
        raise SparsetuneError(f"{what} {text!r} contains a NUL byte")
    long = next((part for part in Path(text).parts if len(part.encode()) > 255), None)
    if long is not None:
        raise SparsetuneError(f"{what}: the name {long[:40]}... has {len(long.encode())} bytes; at most 255 are "
                              "allowed")
