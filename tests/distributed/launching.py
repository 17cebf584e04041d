"""Helpers of the multi-process tests: a `--launch` run of the tiny recipe, its checkpoint's weights, and the
comparisons every engine's run is held to."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sparsetune.checkpoint.resume import read_weights
from sparsetune.checkpoint.store import CheckpointStore
from tests.e2e_helpers import TINY_TRAIN, child_env, logs_with, train_logs

STEPS = 4
COMMON = [*[o for o in TINY_TRAIN if not o.startswith("train.micro_batch_size")], f"train.max_steps={STEPS}",
          "train.log_every=1", "train.eval_every=0", "train.lr_warmup_steps=0", "regularizer.coef=5.0"]
PREDICTORS = ["predictor.enabled=true", "predictor.rank=4", "predictor.dynamic_eval_batches=2"]
# A full fine-tune carrying every feature a sharding engine must place: a distillation teacher (a frozen full copy,
# sharded like the student), layer-wise MLP distillation (reference MLPs sharded like their layers) and predictors
# with the in-run dynamic-activation evaluation.
FULL = ["distill.weight=0.5", "distill.mlp_weight=1.0", *PREDICTORS]
LORA = ["peft.method=lora", "peft.lora.r=4", "distill.weight=0.5", "distill.mlp_weight=1.0", *PREDICTORS,
        "predictor.only_steps=1", "train.eval_every=2"]
FROZEN = ["train.freeze_model=true", *PREDICTORS, "train.max_steps=3"]
STEP_KEYS = ("train/loss", "train/lm_loss", "train/reg_loss", "train/distill_loss", "train/mlp_distill_loss",
             "train/predictor_loss")
DYNAMIC_KEYS = ("dense/perplexity", "oracle/perplexity", "oracle/sparsity", "predicted/perplexity",
                "predicted/sparsity")


@dataclass
class Launched:
    """A finished run folder and what its launches printed."""

    run: Path
    log: str  # the stdout of every launch of the run, in order
    first: str = ""  # the stdout of the launch stopped at step 2 (a stopped and resumed run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**env: str) -> dict:
    """The environment of a launch: the test hooks (tests/hooks), W&B offline, one thread per process."""
    return child_env(hooks=True, WANDB_MODE="offline", OMP_NUM_THREADS="1", **env)


def sparsetune(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsetune", *args], capture_output=True, text=True,
                          env=launch_env(**(env or {})), timeout=timeout)


def launch_argv(model: Path, out: Path, preset: str, *extra: str, processes: int = 2) -> list[str]:
    """`sparsetune train` of the tiny recipe under `--launch PRESET`: the global batch of 8 rows, whatever the
    process count, and 2 held-out batches per process."""
    return [sys.executable, "-m", "sparsetune", "train", "quickstart", f"model.path={model}", f"output_dir={out}",
            *COMMON, f"train.micro_batch_size={8 // processes}", f"train.eval_batches={2 * processes}", *extra,
            "--launch", preset, "--num-processes", str(processes), "--main-process-port", str(free_port())]


def launched(model: Path, out: Path, preset: str, *extra: str, env: dict | None = None, processes: int = 2):
    proc = subprocess.run(launch_argv(model, out, preset, *extra, processes=processes), capture_output=True,
                          text=True, env=launch_env(**(env or {})), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def stop_and_resume(model: Path, run: Path, preset: str, *extra: str) -> tuple[str, str]:
    """A launch stopped at step 2 by the preemption hook, then `--resume`d to the end: (first, second) stdout."""
    first = launched(model, run, preset, *extra, env={"SPARSETUNE_TEST_PREEMPT_AT_STEP": "2"})
    assert "stopped at step 2" in first.stdout
    second = launched(model, run, preset, *extra, "--resume")
    assert "resuming from" in second.stdout and "step 2" in second.stdout
    return first.stdout, second.stdout


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return read_weights(run / "checkpoints" / latest / "model")


def latest_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def held_parameters(log: str, what: str = "parameters") -> list[tuple[int, int]]:
    """(held, total) of every "holds H of T <what>" line a sharded run printed."""
    return [(int(a.replace(",", "")), int(b.replace(",", "")))
            for a, b in re.findall(rf"holds ([\d,]+) of ([\d,]+) {what}", log)]


def assert_shards(log: str, what: str = "parameters") -> None:
    held = held_parameters(log, what)
    assert held and all(h < 0.6 * t for h, t in held), held  # each rank holds about half


def per_step(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in train_logs(run)}


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].numel() > 0, k
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max().item())


def assert_same_training(a: dict, b: dict, init_dir: Path) -> None:
    """Another engine's result equals the reference up to float reduction order: the difference is under 1%
    of how far training moved the weights (a lost optimizer state or a skipped step is ~100%)."""
    init = read_weights(init_dir)
    assert a.keys() == b.keys()
    diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)
    moved = sum(float((b[k] - init[k]).double().pow(2).sum()) for k in b if k in init)
    assert all(a[k].shape == b[k].shape and a[k].numel() > 0 for k in a)
    assert moved > 0 and (diff / moved) ** 0.5 < 0.01, (diff, moved)


def assert_same_first_step_and_eval(run: Path, reference: Path) -> None:
    """Step 1 (same weights on both) and the step-0 evaluation, dynamic figures included, equal the reference's."""
    ours, ref = train_logs(run)[0], train_logs(reference)[0]
    for key in STEP_KEYS:
        if key in ref:
            assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
    ours, ref = logs_with(run, "eval/perplexity")[0], logs_with(reference, "eval/perplexity")[0]
    assert ours["step"] == ref["step"] == 0
    assert ours["eval/perplexity"] == pytest.approx(ref["eval/perplexity"], rel=1e-4)
    for key in DYNAMIC_KEYS:
        assert ours[f"eval/dynamic/{key}"] == pytest.approx(ref[f"eval/dynamic/{key}"], rel=1e-4), key


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(CheckpointStore(run).latest_complete() / "model" / "adapter_model.safetensors"))


def export_run(run: Path, out: Path) -> Path:
    """`sparsetune export RUN --out OUT --no-eval`, in this process (the run's own processes are gone)."""
    from sparsetune.cli import main

    if not out.exists():
        assert main(["export", str(run), "--out", str(out), "--no-eval"]) == 0
    return out


def two_machines(model: Path, run: Path, *extra: str):
    """Two "machines" over loopback, one process each (`--num-machines 2 --machine-rank R`): rank 0's stdout."""
    base = [sys.executable, "-m", "sparsetune", "train", "quickstart", f"model.path={model}", f"output_dir={run}",
            *COMMON, *extra, "--launch", "ddp", "--num-processes", "1", "--num-machines", "2",
            "--main-process-ip", "127.0.0.1", "--main-process-port", str(free_port())]
    env = child_env(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(base + ["--machine-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return Launched(run, outs[0][0])
