"""Helpers for tests that drive the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetune.cli import main

# W&B disabled by default: an offline W&B run costs about a second per training (several for the first). A test that
# reads the offline run folder (wandb/offline-run-*) or asserts W&B behaviour passes "wandb.mode=offline" itself.
# wandb.mode stays the last item (tests/activations/test_plugin.py drops it with TINY_TRAIN[:-1]).
TINY_TRAIN = ["data.seq_len=64", "train.micro_batch_size=8", "train.lr=3e-3", "train.eval_batches=2",
              "distill.weight=0", "wandb.mode=disabled"]


def train_tiny(model_dir: Path, out: Path, *overrides: str, recipe: str = "quickstart") -> int:
    return main(["train", recipe, f"model.path={model_dir}", f"output_dir={out}", *TINY_TRAIN, *overrides])


def read_metrics(run: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in the order written."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def logs_with(run: Path, key: str) -> list[dict]:
    """The metrics.jsonl records that hold `key` (e.g. "eval/sparsity"), in the order written."""
    return [m for m in read_metrics(run) if key in m]


def train_logs(run: Path) -> list[dict]:
    """The training-step records (those with "train/loss")."""
    return logs_with(run, "train/loss")


def train_steps(run: Path) -> list[int]:
    """The steps of the training-step records in the order written, repeats kept."""
    return [m["step"] for m in train_logs(run)]


HOOKS = Path(__file__).parent / "hooks"


def child_env(hooks: bool = False, **extra: str) -> dict:
    """Environment for a sparsetune child process. WANDB_SERVICE is dropped: wandb exports it after the
    first in-process run, and a child attached to the test process's W&B service would leave its run
    registered there when killed (a real preempted job takes its own service down with it).
    `hooks`: load tests/hooks/sitecustomize.py in the child (fault injection through SPARSETUNE_TEST_* variables)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    if hooks:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOKS), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def preempt_at(monkeypatch, step: int) -> None:
    """In this process: behave as if SIGTERM arrived during `step` (the same hook as tests/hooks for children)."""
    from sparsetune.training import preemption

    original = preemption.PreemptionGuard.should_stop

    def should_stop(self, at: int) -> bool:
        if at == step and not self.requested:
            self.requested, self.signal_name = True, "SIGTERM (test hook)"
        return original(self, at)

    monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", should_stop)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console entry point in a fresh process (exit code, stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "sparsetune", *args], capture_output=True, text=True, cwd=cwd,
                          env=child_env(WANDB_MODE="offline"), timeout=600)


def read_wandb_run(run_folder: Path) -> dict:
    """{'run_ids': [...], 'history': [row, ...]} of one offline W&B run folder (offline-run-*), read by W&B's
    own reader of the run-<id>.wandb log, `wandb leet inspect --json`. History rows are W&B's: `_step` is
    the step, nested keys such as a table's type read "tradeoff._type"."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_folder)],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0, f"wandb leet inspect failed: {proc.stderr[-2000:]}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {"run_ids": [r["run"]["run_id"] for r in records if r["type"] == "run"],
            "history": [r["history"]["item"] for r in records if r["type"] == "history"]}


def one_error(capsys, code: int, pattern: str) -> str:
    """The command exited 2 with exactly one `error:` line matching `pattern` and no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1 and re.search(pattern, lines[0]), err[-2000:]
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real small filesystem mounted at `path` (a full disk, a read-only mount): skipped where mount is refused."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:  # root in a container without CAP_SYS_ADMIN
        pytest.skip(f"mount is not permitted here: {mounted.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
