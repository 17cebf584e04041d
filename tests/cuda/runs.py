"""The tiny runs the CUDA tests compare: `sparsetune train` of the tests' tiny Llama as one plain process, in a
child process of its own, with the multi-process tests' settings (tests/distributed/launching.py: COMMON,
4 steps, here micro-batch 8 on one process). A child each, because accelerate fixes a process's mixed precision at
its first Accelerator, and these runs differ in it."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.launching import COMMON, sparsetune

FP32 = "train.mixed_precision='no'"  # quoted: YAML reads a bare no as false


def train_child(model_dir: Path, out: Path, *overrides: str, env: dict | None = None) -> tuple[Path, str]:
    """(run folder, its stdout) of a finished run."""
    proc = sparsetune("train", "quickstart", f"model.path={model_dir}", f"output_dir={out}", *COMMON,
                      "train.micro_batch_size=8", *overrides, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout
