"""Helpers for tests that drive the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sparsetune.cli import main

TINY_TRAIN = ["data.seq_len=64", "train.micro_batch_size=8", "train.lr=3e-3", "train.eval_batches=2",
              "distill.weight=0", "wandb.mode=offline"]


def train_tiny(model_dir: Path, out: Path, *overrides: str, recipe: str = "quickstart") -> int:
    return main(["train", recipe, f"model.path={model_dir}", f"output_dir={out}", *TINY_TRAIN, *overrides])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def child_env(**extra: str) -> dict:
    """Environment for a sparsetune child process. WANDB_SERVICE is dropped: wandb exports it after the
    first in-process run, and a child attached to the test process's W&B service would leave its run
    registered there when killed (a real preempted job takes its own service down with it)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console entry point in a fresh process (exit code, stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "sparsetune", *args], capture_output=True, text=True, cwd=cwd,
                          env=child_env(WANDB_MODE="offline"), timeout=600)
