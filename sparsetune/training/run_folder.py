"""A run's output_dir from its claim to its release: the one place that makes, locks, plans, writes and cleans the
run folder, so that the trainer only asks it.

  RunDir.check_name(path)  before any process group: a file there, a NUL byte or an over-long name is one line
  plan(...)                main process: claim the folder (make it, recording what it made; take its lock for the
                           whole run), decide how the run uses it (`plan_output_dir`: new / clear an earlier run /
                           resume a checkpoint), verify the checkpoint once (its layout version, the recipe changes
                           judged by the run's components, the process count, a LoRA run's base model); every rank
                           gets the same decision, or the same one-line error
  check_data(...)          a resume on other rows than its checkpoint's: refused, or a notice with --allow-data-change
  open(...)                main process: the debris of killed runs, --overwrite's clearing, the run marker,
                           recipe.yaml, recipe-history.jsonl; a resume sets newer checkpoints aside and drops what was
                           logged after its checkpoint. From here on the run exists and its files are kept.
  undo()                   setup failed or was stopped before the run started: remove what this process wrote and
                           the folders it made (if empty), nothing else
  release()                let go of the lock at the end of the run

Which folders may be cleared is checkpoint/folders.py's rule, the lock checkpoint/locks.py's, the checkpoints
themselves checkpoint/store.py's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list

from sparsetune.checkpoint.base_model import run_base_fingerprint
from sparsetune.checkpoint.folders import (
    RUN_MARKER,
    RunFolder,
    clear_run,
    foreign_error,
    inspect_run_folder,
    mark_run,
    resolve_link,
)
from sparsetune.checkpoint.locks import FolderLock, run_lock
from sparsetune.checkpoint.resume import RecipeChange, check_process_count, check_recipe
from sparsetune.checkpoint.state import read_trainer_state
from sparsetune.checkpoint.storage import storage_failure
from sparsetune.checkpoint.store import CheckpointStore, check_layout, checkpoint_problem, write_atomic
from sparsetune.console import notice
from sparsetune.data.fingerprint import FILE as DATA_FINGERPRINT
from sparsetune.data.fingerprint import data_change
from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import Recipe
from sparsetune.tracking.files import MetricFiles


@dataclass
class RunPlan:
    """What the run does with its output_dir: resume from a checkpoint, clear an earlier run, or start fresh."""

    resume_from: Path | None = None
    clear: bool = False
    restart: bool = False  # --resume of a run stopped before its first checkpoint: the same run from step 0


def find_resume_checkpoint(run_dir: Path, explicit: str | None, report: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from: `explicit` (a checkpoint folder) or the newest usable one of run_dir's
    lineage (damaged ones are reported and skipped)."""
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise SparsetuneError(f"--resume {explicit}: no such checkpoint folder")
        problem = checkpoint_problem(path)
        if problem:
            raise SparsetuneError(f"--resume {explicit}: checkpoint is not usable: {problem}")
        return path
    return CheckpointStore(run_dir).latest_complete(report=report)


def plan_output_dir(run_dir: Path, resume: bool | str | None, overwrite: bool,
                    report: Callable[[str], None]) -> RunPlan:
    """Decide, before anything is written, how a run uses `run_dir`. Nothing here deletes or moves files.

    --resume never deletes: with no usable checkpoint in a folder that holds a run it stops with one line.
    --overwrite clears only a folder marked as a sparsetune run. A folder sparsetune did not make is refused."""
    state = inspect_run_folder(run_dir)
    if resume:
        explicit = resume if isinstance(resume, str) else None
        skipped: list[str] = []

        def note(message: str) -> None:
            skipped.append(message)
            report(message)

        found = find_resume_checkpoint(run_dir, explicit, report=note)
        if found is not None:
            if state is RunFolder.FOREIGN:
                raise foreign_error(run_dir, "cannot take a resumed run")
            return RunPlan(resume_from=found)
        if state in (RunFolder.ABSENT, RunFolder.EMPTY):
            report(f"--resume: {run_dir} holds no run yet, starting a new one")
            return RunPlan()
        if state is RunFolder.FOREIGN:
            raise foreign_error(run_dir, "holds no sparsetune run to resume")
        if not skipped and not CheckpointStore(run_dir).folders() and not explicit:
            report(f"--resume: {run_dir} holds a run stopped before its first checkpoint; starting it again from "
                   "step 0 (same recipe and seed)")
            return RunPlan(clear=True, restart=True)
        damaged = "; ".join(s.removeprefix("skipping damaged checkpoint ") for s in skipped) or "none were written"
        raise SparsetuneError(
            f"--resume: no usable checkpoint in {run_dir}/checkpoints ({damaged}); nothing was deleted: repair or "
            f"remove the damaged checkpoint, resume from another with --resume CHECKPOINT, or start over with "
            f"--overwrite")
    if state is RunFolder.RUN and not overwrite:
        raise SparsetuneError(f"output_dir {run_dir} already holds a run; choose another output_dir, continue it "
                              "with --resume, or pass --overwrite")
    if state is RunFolder.FOREIGN:
        raise foreign_error(run_dir, "refusing to " + ("delete it" if overwrite else "write into it"))
    return RunPlan(clear=state is RunFolder.RUN)


class RunDir:
    """The output_dir of one run. `command` is the command line that started it (the lock names it, the run marker
    records it). After `plan`: `resume_from` (the checkpoint to resume from, or None), `recipe_changes` (what the
    resume changed, for recipe-history.jsonl), `base_fingerprint` (the base model a LoRA or frozen run records)."""

    def __init__(self, path: Path, command: str):
        self.path = Path(path)
        self.command = command
        self.is_main = True
        self.resume_from: Path | None = None
        self.clear = False  # --overwrite, or a restart before the first checkpoint: the earlier run is cleared
        self.recipe_changes: list[str] = []
        self.base_fingerprint: dict | None = None
        self.lock: FolderLock | None = None
        # what this process made, and only that, is removed when setup fails (main process)
        self._created: list[Path] = []
        self._written: list[Path] = []
        self.store = CheckpointStore(self.path)
        self.files = MetricFiles(self.path)

    @staticmethod
    def check_name(path: Path) -> None:
        """A file there, a NUL byte or an over-long name: one line before any process group."""
        inspect_run_folder(resolve_link(Path(path), "output_dir"))

    # ------------------------------------------------------------------ plan
    def plan(self, recipe: Recipe, accelerator, resume: bool | str | None, overwrite: bool, sharded_optimizer: bool,
             judge: Callable[[RecipeChange], None]) -> None:
        """The main process claims the folder and decides how the run uses it, verifying the checkpoint it resumes
        from once (`judge`: the run's components' verdicts on recipe changes); every rank gets the same decision,
        or the same one-line error."""
        self.is_main = accelerator.is_main_process
        decision: list = [None]
        if self.is_main:
            try:
                decision[0] = ("ok", *self._plan(recipe, accelerator.num_processes, resume, overwrite,
                                                  sharded_optimizer, judge))
            except SparsetuneError as exc:
                decision[0] = ("error", str(exc), None)
        if accelerator.num_processes > 1:
            broadcast_object_list(decision)
        status, plan, path = decision[0]
        if status == "error":
            raise SparsetuneError(plan)
        self._move_to(Path(path))
        self.resume_from, self.clear = plan.resume_from, plan.clear

    def _plan(self, recipe: Recipe, num_processes: int, resume, overwrite: bool, sharded_optimizer: bool, judge
              ) -> tuple[RunPlan, str]:
        self._claim()
        plan = plan_output_dir(self.path, resume, overwrite, report=notice)
        if plan.resume_from is not None:
            check_layout(plan.resume_from)
        self.base_fingerprint = run_base_fingerprint(recipe, plan.resume_from)
        if plan.resume_from is not None:
            self.recipe_changes = check_recipe(plan.resume_from, recipe, report=notice, judge=judge)
            check_process_count(plan.resume_from, num_processes, sharded_optimizer)
        elif plan.restart and (self.path / "recipe.yaml").is_file():
            self.recipe_changes = check_recipe(self.path, recipe, report=notice, judge=judge)
        return plan, str(self.path)

    def _move_to(self, path: Path) -> None:
        self.path = path
        self.store = CheckpointStore(path)
        self.files = MetricFiles(path)

    def _claim(self) -> None:
        """Make output_dir (what this process creates is recorded, and only that is removed if setup fails) and
        take its lock for the whole run, before anything reads or writes in it. A symlinked output_dir is its
        target."""
        path = resolve_link(self.path, "output_dir", notice)
        self._move_to(path)
        inspect_run_folder(path)
        missing = [d for d in [path, *path.parents] if not d.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()  # atomic: succeeds for exactly one process, so "this process made it" is true
                self._created.append(folder)
        except FileExistsError:
            pass  # another process made it first: it is not ours
        except OSError as exc:
            raise SparsetuneError(f"cannot create output_dir {path}: {storage_failure(exc) or exc}") from None
        try:
            self.lock = run_lock(path).acquire(self.command)
        except OSError as exc:
            self.undo()
            raise SparsetuneError(f"cannot write into output_dir {path}: {storage_failure(exc) or exc}") from None
        except SparsetuneError:
            self.undo()
            raise

    # ------------------------------------------------------------ the data
    def check_data(self, fingerprint: dict, allow_change: bool) -> None:
        """A resume on other rows than its checkpoint's stops with one line before anything is written, unless
        `allow_change` (--allow-data-change: then a notice, and recipe-history.jsonl records it)."""
        if self.resume_from is None:
            return
        found = data_change(json.loads((self.resume_from / DATA_FINGERPRINT).read_text()), fingerprint)
        if found is None:
            return
        change, effect = found
        if not allow_change:
            raise SparsetuneError(f"{change}; resume would {effect}; pass --allow-data-change to continue on the new "
                                  "data")
        if self.is_main:
            step = read_trainer_state(self.resume_from)["step"]
            notice(f"resume: {change}; --allow-data-change: from step {step + 1} on the run will {effect}")
        self.recipe_changes.append(f"data: {change} (--allow-data-change)")

    # ------------------------------------------------------------------ open
    def open(self, recipe_yaml: str, step: int, accelerator) -> None:
        """The main process writes the run's own files (a full or read-only disk: one line, on every rank); every
        rank waits for it."""
        failed: list = [None]
        if self.is_main:
            try:
                self._write(recipe_yaml, step)
            except OSError as exc:
                failed[0] = f"cannot write into output_dir {self.path}: {storage_failure(exc) or exc}"
        if accelerator.num_processes > 1:
            broadcast_object_list(failed)
        if failed[0]:
            raise SparsetuneError(failed[0])
        accelerator.wait_for_everyone()

    def _write(self, recipe_yaml: str, step: int) -> None:
        self.store.clean_debris(notice)  # under the lock: nothing here belongs to a live process
        if self.clear:
            clear_run(self.path, notice)
        if mark_run(self.path, self.command):
            self._written.append(self.path / RUN_MARKER)
        recipe_file = self.path / "recipe.yaml"
        if not recipe_file.exists():
            self._written.append(recipe_file)
        write_atomic(recipe_file, recipe_yaml)
        if self.recipe_changes:  # what the resume changed, and from which step: the recipe's history
            with open(self.path / "recipe-history.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "from": str(self.resume_from or "a restart before the first checkpoint"),
                                    "changes": self.recipe_changes}) + "\n")
        if self.resume_from is not None:
            # A resume starts the lineage at its checkpoint: newer checkpoints are set aside (never deleted),
            # and what was logged after the checkpoint is dropped, so no step is logged twice.
            self.store.set_aside_after(step, notice)
            if self.resume_from.parent.resolve() == self.store.root.resolve():
                self.store.point_latest_at(self.resume_from)
            self.files.drop_torn_lines(notice)
            self.files.truncate_after(step)

    def keep(self) -> None:
        """The run exists from here on: its files are kept whatever happens."""
        self._written.clear()

    # --------------------------------------------------------- undo, release
    def undo(self) -> None:
        """Setup failed or was stopped before the run started: remove the files this process wrote and the folders
        it made, if they are empty now; nothing else (a file someone put there meanwhile stays)."""
        if not self.is_main:
            return
        for path in reversed(self._written):
            path.unlink(missing_ok=True)
        self._written.clear()
        if self.lock is not None:
            self.lock.release(remove=self.lock.created_file)
            self.lock = None
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        self._created.clear()

    def release(self) -> None:
        """Let go of the lock (the run is over, finished or not)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
