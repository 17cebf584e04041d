"""Where a test delivers a real signal, or pauses, inside a sparsetune process (never imported by sparsetune).

`install(spec)` wraps one function of sparsetune so that, when the run reaches that phase, the process sends
itself a REAL signal with os.kill (SIGTERM, SIGINT: the run's own handler sees it; SIGKILL: the process dies there,
as under `kill -9` or the OOM killer), or pauses there (touching a sentinel file first) so that another process
can act meanwhile. Used in-process by tests and, through sitecustomize.py, in child processes:

  SPARSETUNE_TEST_SIGNAL="PHASE:SIGNAL[:STEP]"   e.g. "eval:SIGTERM", "prune:SIGKILL", "step:SIGKILL:1"
  SPARSETUNE_TEST_PAUSE="PHASE[:STEP]"  with  SPARSETUNE_TEST_SENTINEL=FILE, SPARSETUNE_TEST_PAUSE_S=SECONDS

Phases: setup (while the data is tokenized), eval (at the start of an evaluation), step (before step STEP),
checkpoint (half-way through writing checkpoint STEP: after the weights), prune (half-way through deleting an old
checkpoint), clear (half-way through --overwrite removing checkpoints/), export-write (the export's copy is written,
not yet in place), export-swap (between the two renames replacing an earlier export), export (export holds its lock),
fit (inside the `thresholds` conversion's fit, after the last step by default).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path


def _fire(action: str, sentinel: str | None, pause_s: float) -> None:
    if action == "pause":
        if sentinel:
            Path(sentinel).write_text(str(os.getpid()))
        end = time.monotonic() + pause_s
        while time.monotonic() < end and (not sentinel or Path(sentinel).exists()):  # the test deletes it to go on
            time.sleep(0.05)
        return
    os.kill(os.getpid(), getattr(signal, action))
    time.sleep(0.2)  # let the handler run (SIGTERM/SIGINT) before the phase goes on


def install(phase: str, action: str, step: int | None = None, sentinel: str | None = None,
            pause_s: float = 30.0, patch=setattr) -> None:
    """Fire `action` ("SIGTERM", "SIGINT", "SIGKILL" or "pause") once, when the process reaches `phase`.
    `patch`: how a function is replaced (a test's `monkeypatch.setattr`, so it is undone after the test)."""
    state = {"done": False}

    def fire_once() -> None:
        if not state["done"]:
            state["done"] = True
            _fire(action, sentinel, pause_s)

    if phase == "setup":
        from sparsetune.training import trainer

        pack = trainer.pack

        def pack_then(*args, **kwargs):
            fire_once()
            return pack(*args, **kwargs)

        patch(trainer, "pack", pack_then)
    elif phase in ("eval", "step"):
        from sparsetune.training.trainer import Trainer

        name = "evaluate" if phase == "eval" else "train_step"
        original = getattr(Trainer, name)

        def wrapped(self, *args, **kwargs):
            if phase == "eval" or self.progress.step + 1 == step:
                fire_once()
            return original(self, *args, **kwargs)

        patch(Trainer, name, wrapped)
    elif phase == "checkpoint":
        from sparsetune.training import engines

        save_state = engines.Engine.save_state

        def save_state_then(self, model, optimizer, folder):
            save_state(self, model, optimizer, folder)
            if folder.name.endswith(f"step-{step:08d}"):
                fire_once()

        patch(engines.Engine, "save_state", save_state_then)
    elif phase in ("prune", "clear"):
        rmtree = shutil.rmtree

        def rmtree_then(path, *args, **kwargs):
            p = Path(path)
            doomed = p.name.startswith(".del-step-") if phase == "prune" else p.name == "checkpoints"
            if doomed and p.is_dir():
                victims = sorted(x for x in p.rglob("*") if x.is_file())
                for victim in victims[: max(1, len(victims) // 2)]:  # half of it is gone, then the kill
                    victim.unlink()
                fire_once()
            return rmtree(path, *args, **kwargs)

        patch(shutil, "rmtree", rmtree_then)
    elif phase in ("export-write", "export"):
        from sparsetune.export import exporter

        name = "replace_folder" if phase == "export-write" else "_export"
        original = getattr(exporter, name)

        def wrapped(*args, **kwargs):
            fire_once()
            return original(*args, **kwargs)

        patch(exporter, name, wrapped)
    elif phase == "fit":
        from sparsetune.training.components import thresholds

        fit = thresholds.fit_thresholds

        def fit_then(*args, **kwargs):
            fire_once()
            return fit(*args, **kwargs)

        patch(thresholds, "fit_thresholds", fit_then)
    elif phase == "export-swap":
        replace = os.replace

        def replace_then(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if re.match(r"^\..*\.old\d+$", Path(dst).name):
                fire_once()

        patch(os, "replace", replace_then)
    else:
        raise ValueError(f"unknown fault phase {phase!r}")


def install_from_env() -> None:
    spec = os.environ.get("SPARSETUNE_TEST_SIGNAL")
    sentinel = os.environ.get("SPARSETUNE_TEST_SENTINEL")
    if spec:
        phase, sig, *step = spec.split(":")
        install(phase, sig, int(step[0]) if step else None, sentinel)
    pause = os.environ.get("SPARSETUNE_TEST_PAUSE")
    if pause:
        phase, *step = pause.split(":")
        install(phase, "pause", int(step[0]) if step else None, sentinel,
                float(os.environ.get("SPARSETUNE_TEST_PAUSE_S", "30")))
