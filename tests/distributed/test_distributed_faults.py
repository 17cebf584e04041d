"""Faults that need several real processes: preemption of a `--launch` job, a held-out set too short for every
rank under sharded parameters, and the dynamic evaluation over every rank's rows."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from sparsetune.checkpoint.store import CheckpointStore
from tests.distributed.launching import (
    DYNAMIC_KEYS,
    STEPS,
    assert_weights_close,
    final_weights,
    launch_argv,
    launch_env,
    launched,
)
from tests.e2e_helpers import logs_with, train_steps, train_tiny

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.xdist_group("plain")
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_resumes_to_the_uninterrupted_weights(runs, tmp_path):
    """A real SIGTERM to the launcher while both workers wait before step 3 (tests/hooks: the pause, nothing
    else); the workers finish step 3, checkpoint and exit 0; `--resume` ends at exactly the weights of the
    uninterrupted DDP run of the same recipe (runs.ddp_plain: the same command without the signal)."""
    run, sentinel = tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen(launch_argv(runs.model, run, "ddp"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=launch_env(SPARSETUNE_TEST_PAUSE="step:3",
                                                      SPARSETUNE_TEST_SENTINEL=str(sentinel),
                                                      SPARSETUNE_TEST_PAUSE_S="120"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not sentinel.exists():
        time.sleep(0.05)
    assert sentinel.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler or `kill PID` would
    printed = []
    for line in proc.stdout:  # the launcher says so once it has signalled both workers, which are still waiting
        printed.append(line)
        if "SIGTERM received by the launcher" in line:
            break
    sentinel.unlink()  # both go on: step 3 ends, they agree to stop and checkpoint
    out = "".join(printed) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received by the launcher; forwarded to 2 worker(s)" in out
    assert "stopped at step 3 (SIGTERM)" in out and "Traceback" not in out
    ckpt = CheckpointStore(run).latest_complete()
    assert ckpt.name.endswith("step-00000003")
    assert (ckpt / "rng_state_rank0.json").is_file() and (ckpt / "rng_state_rank1.json").is_file()
    resumed = launched(runs.model, run, "ddp", "--resume")
    assert f"resuming from {ckpt} at step 3" in resumed.stdout
    assert train_steps(run) == list(range(1, STEPS + 1))  # each step logged once across the stop
    assert_weights_close(final_weights(run), final_weights(runs.ddp_plain().run), atol=0)


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


@pytest.mark.xdist_group("full")
def test_ddp_dynamic_eval_figures_are_over_all_ranks(runs):
    """The shared DDP run (predictor.dynamic_eval_batches=2: 2 ranks x 4 rows) against one process over the same
    8 rows (dynamic_eval_batches=1 of 8, tests/distributed/conftest.py)."""
    ours = logs_with(runs.ddp_full().run, "eval/dynamic/dense/perplexity")[0]  # step 0: same predictors
    ref = logs_with(runs.single_full().run, "eval/dynamic/dense/perplexity")[0]
    assert ours["step"] == ref["step"] == 0
    for key in DYNAMIC_KEYS:
        assert ours[f"eval/dynamic/{key}"] == pytest.approx(ref[f"eval/dynamic/{key}"], rel=1e-4), key
