"""Faults that need several real processes: preemption of a `--launch` job, a held-out set too short for every
rank under sharded parameters, and the dynamic evaluation over every rank's rows."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from sparsetune.checkpoint.store import CheckpointStore
from tests.distributed.launching import COMMON, DYNAMIC_KEYS, free_port, launched
from tests.e2e_helpers import child_env, logs_with, train_logs, train_steps, train_tiny

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_sigterm_to_the_launcher_checkpoints_every_rank_and_resumes(tiny_model_dirs, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sparsetune", "train", "quickstart", f"model.path={tiny_model_dirs['llama']}",
           f"output_dir={run}", *COMMON, "train.max_steps=2000", "train.micro_batch_size=4", "train.eval_batches=2",
           "--launch", "ddp", "--num-processes", "2", "--main-process-port", str(free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(WANDB_MODE="disabled", OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(train_logs(run)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler or `kill PID` would
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received by the launcher; forwarded to 2 worker(s)" in out
    assert re.search(r"stopped at step \d+ \(SIGTERM\)", out) and "Traceback" not in out
    ckpt = CheckpointStore(run).latest_complete()
    stop = int(ckpt.name.split("-")[1])
    assert 3 <= stop < 2000
    assert (ckpt / "rng_state_rank0.json").is_file() and (ckpt / "rng_state_rank1.json").is_file()
    resumed = launched(tiny_model_dirs["llama"], run, "ddp", f"train.max_steps={stop + 2}", "--resume")
    assert f"resuming from {ckpt} at step {stop}" in resumed.stdout
    assert train_steps(run) == list(range(1, stop + 3))


def test_sharded_eval_with_too_few_held_out_rows_pads_instead_of_hanging(runs, tmp_path):
    fsdp = runs.fsdp_uneven_held_out()  # the held-out set gives the two ranks different batch counts
    text, held = fsdp.run.parent / "train.txt", fsdp.run.parent / "held.txt"
    evals = logs_with(fsdp.run, "eval/perplexity")
    assert len(evals) == 2 and all(m["eval/perplexity"] > 1 for m in evals), fsdp.log[-2000:]
    # the figures count real tokens only: the same as one process evaluating the same rows
    single = tmp_path / "single"
    assert train_tiny(runs.model, single, f"data.path={text}", f"data.eval_path={held}",
                      "train.max_steps=1", "train.eval_every=0", "wandb.mode=disabled", "train.eval_batches=4",
                      "train.micro_batch_size=4") == 0
    first = logs_with(single, "eval/perplexity")[0]
    assert evals[0]["eval/perplexity"] == pytest.approx(first["eval/perplexity"], rel=1e-4)
    assert evals[0]["eval/sparsity"] == pytest.approx(first["eval/sparsity"], abs=1e-4)


def test_ddp_dynamic_eval_figures_are_over_all_ranks(runs):
    """The shared DDP run (predictor.dynamic_eval_batches=2: 2 ranks x 4 rows) against one process over the same
    8 rows (dynamic_eval_batches=1 of 8, tests/distributed/conftest.py)."""
    ours = logs_with(runs.ddp_full().run, "eval/dynamic/dense/perplexity")[0]  # step 0: same predictors
    ref = logs_with(runs.single_full().run, "eval/dynamic/dense/perplexity")[0]
    assert ours["step"] == ref["step"] == 0
    for key in DYNAMIC_KEYS:
        assert ours[f"eval/dynamic/{key}"] == pytest.approx(ref[f"eval/dynamic/{key}"], rel=1e-4), key
