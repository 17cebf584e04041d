"""Exact resume: a run stopped anywhere continues as if it had never stopped."""

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from tests.checkpoint.helpers import SCHEDULE, assert_same_weights, final_weights, train_losses
from tests.e2e_helpers import (
    TINY_TRAIN,
    child_env,
    preempt_at,
    read_metrics,
    read_wandb_run,
    train_steps,
    train_tiny,
)

pytestmark = pytest.mark.e2e

# Progressive regularizer schedule + distillation are active, so their state must survive too.
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stop_and_resume_equals_straight_run_bitwise(tiny_model_dirs, tmp_path, monkeypatch, mode):
    extra = (["distill.weight=0.5", "predictor.enabled=true", "predictor.rank=4", "predictor.heads=true"]
             if mode == "full" else ["peft.method=lora", "peft.lora.r=4", "peft.lora.dropout=0.1"])
    args = [*SCHEDULE, "train.max_steps=8", "wandb.mode=offline", *extra]  # its W&B run is read back below
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train_tiny(tiny_model_dirs["llama"], straight, *args) == 0
    with monkeypatch.context() as patch:
        preempt_at(patch, 3)
        assert train_tiny(tiny_model_dirs["llama"], stopped, *args) == 0
    assert CheckpointStore(stopped).latest_complete().name == "step-00000003"
    assert train_tiny(tiny_model_dirs["llama"], stopped, *args, "--resume") == 0

    steps = train_steps(stopped)
    assert steps == list(range(1, 9)), "every step logged exactly once, the first after resume is 4"
    assert train_losses(stopped) == train_losses(straight)  # exact, not approximate
    _, a = final_weights(straight)
    _, b = final_weights(stopped)
    assert_same_weights(a, b)
    if mode == "full":  # co-trained predictors resume exactly too
        pa = load_file(CheckpointStore(straight).latest_complete() / "predictors" / "predictors.safetensors")
        pb = load_file(CheckpointStore(stopped).latest_complete() / "predictors" / "predictors.safetensors")
        assert_same_weights(pa, pb)
    rows = [ln.split(",")[0] for ln in (stopped / "tradeoff.csv").read_text().splitlines()[1:]]
    assert rows == ["0", "4", "8"]
    # one W&B run, continued: the same id in both offline segments, history continuous
    runs = [read_wandb_run(d) for d in sorted((stopped / "wandb").glob("offline-run-*"))]
    assert len(runs) == 2 and len({rid for r in runs for rid in r["run_ids"]}) == 1
    logged = [row["_step"] for r in runs for row in r["history"] if "train/loss" in row]
    assert logged == list(range(1, 9))


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model_dirs, tmp_path):
    args = [*SCHEDULE, "train.max_steps=9", "train.save_every=3", "train.keep_checkpoints=5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train_tiny(tiny_model_dirs["llama"], straight, *args) == 0
    env = child_env(hooks=True, SPARSETUNE_TEST_KILL_IN_SAVE="6")
    cmd = [sys.executable, "-m", "sparsetune", "train", "quickstart", f"model.path={tiny_model_dirs['llama']}",
           f"output_dir={killed}", *TINY_TRAIN, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store = CheckpointStore(killed)
    assert (store.root / ".tmp-step-00000006").is_dir(), "the kill happened mid-write"
    assert store.latest_complete().name == "step-00000003"
    assert (store.root / "latest").read_text().strip() == "step-00000003"
    assert max(m["step"] for m in read_metrics(killed)) == 6  # steps 4..6 were logged before the kill
    assert train_tiny(tiny_model_dirs["llama"], killed, *args, "--resume") == 0
    steps = train_steps(killed)
    assert steps == list(range(1, 10))
    assert train_losses(killed) == train_losses(straight)
    assert_same_weights(final_weights(straight)[1], final_weights(killed)[1])
    assert not (store.root / ".tmp-step-00000006").exists(), "stale partial checkpoint cleaned up"


def test_sigterm_mid_run_checkpoints_exits_0_and_resumes_to_the_same_weights(tiny_model_dirs, tmp_path):
    """A real SIGTERM sent to the training process from outside, mid-run. The child is held before step 4
    (tests/hooks: SPARSETUNE_TEST_PAUSE=step:4) so the signal arrives at a known step: the length of the run is not
    what is tested, only that the step in flight ends in a checkpoint, exit 0, and the resume ends where the
    straight run ends."""
    steps, stop = 10, 4
    args = [f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0", "wandb.mode=disabled",
            "regularizer.schedule=constant"]
    straight, stopped, sentinel = tmp_path / "straight", tmp_path / "stopped", tmp_path / "paused"
    assert train_tiny(tiny_model_dirs["llama"], straight, *args) == 0
    cmd = [sys.executable, "-m", "sparsetune", "train", "quickstart", f"model.path={tiny_model_dirs['llama']}",
           f"output_dir={stopped}", *TINY_TRAIN, *args]
    env = child_env(hooks=True, SPARSETUNE_TEST_PAUSE=f"step:{stop}", SPARSETUNE_TEST_SENTINEL=str(sentinel),
                    SPARSETUNE_TEST_PAUSE_S="120")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not sentinel.exists():
            time.sleep(0.05)
        assert sentinel.exists(), "the run never reached the pause before step 4"
        assert train_steps(stopped) == list(range(1, stop)), "mid-run: steps 1..3 done and logged"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the run's handler takes it while paused
        sentinel.unlink()  # go on: step 4 runs, then the checkpoint and exit
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-2000:]
    assert "SIGTERM received" in out and "resume with: sparsetune train quickstart" in out and "--resume" in out
    stop_step = int(CheckpointStore(stopped).latest_complete().name.split("-")[1])
    assert 0 < stop_step < steps
    assert stop_step == stop, "the step in flight when the signal came ends in the checkpoint"
    assert train_tiny(tiny_model_dirs["llama"], stopped, *args, "--resume") == 0
    assert train_steps(stopped) == list(range(1, steps + 1))
    assert_same_weights(final_weights(straight)[1], final_weights(stopped)[1])


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_model_dirs, tmp_path, capsys, damage):
    run = tmp_path / "run"
    base = ["train.eval_every=0", "wandb.mode=disabled", "train.save_every=2", "train.keep_checkpoints=3"]
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=4", *base) == 0
    victim = run / "checkpoints" / "step-00000004" / "optimizer.pt"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.unlink()
    capsys.readouterr()
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=6", *base, "--resume") == 0
    out = capsys.readouterr().out
    expected = "has 100 bytes, expected" if damage == "truncate" else "optimizer.pt is missing"
    line = next(ln for ln in out.splitlines() if "skipping damaged checkpoint" in ln)
    assert expected in line and "step-00000004" in line
    assert "resuming from" in out and "step-00000002 at step 2" in out
    assert "resume: using the new value of train.max_steps: 4 -> 6" in out
    # the damaged checkpoint is set aside, not deleted, and the new lineage continues from step 2
    assert (run / "checkpoints" / "abandoned" / "step-00000004").is_dir()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"


def test_recipe_changes_on_resume(tiny_model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train.eval_every=0", "wandb.mode=disabled", "train.max_steps=2"]
    assert train_tiny(tiny_model_dirs["llama"], run, *base) == 0
    assert train_tiny(tiny_model_dirs["llama"], run, *base, "relufy.activation=drelu", "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "relufy.activation: 'relu' -> 'drelu'" in err
    assert train_tiny(tiny_model_dirs["llama"], run, *base, "--resume") == 0
    assert "already complete at step 2" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert train_tiny(tiny_model_dirs["llama"], fresh, *base, "--resume") == 0
    assert "holds no run yet, starting a new one" in capsys.readouterr().out
    assert CheckpointStore(fresh).latest_complete().name == "step-00000002"


def test_output_dir_written_another_way_is_the_same_run(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["train.eval_every=0", "wandb.mode=disabled", "train.max_steps=1"]
    assert main(["train", "quickstart", f"model.path={tiny_model_dirs['llama']}", "output_dir=run",
                 *TINY_TRAIN, *base]) == 0
    assert train_tiny(tiny_model_dirs["llama"], tmp_path / "run", *base, "train.max_steps=2", "--resume") == 0
    assert "resuming from" in capsys.readouterr().out


def test_checkpoint_state_loads_without_executing_code(tiny_model_dirs, tmp_path):
    import torch

    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=1", "train.eval_every=0",
                      "wandb.mode=disabled") == 0
    ckpt = CheckpointStore(run).latest_complete()
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.load(ckpt / name, weights_only=True)  # raises if anything but tensors/containers were pickled
    for name in ("trainer_state.json", "rng_state_rank0.json", "checkpoint.json"):
        json.loads((ckpt / name).read_text())
    assert sorted(p.suffix for p in (ckpt / "model").iterdir()) == [".json", ".json", ".safetensors"]
