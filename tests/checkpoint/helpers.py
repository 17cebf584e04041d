"""What the resume tests share: a run stopped by a SIGTERM at a step and resumed, compared with a straight run
(per-step losses and final weights, exactly)."""

from __future__ import annotations

from safetensors.torch import load_file

from sparsetune.checkpoint.store import CheckpointStore
from tests.e2e_helpers import preempt_at, train_logs, train_tiny

SCHEDULE = ["regularizer.schedule=prosparse",
            "regularizer.stages=[{end_step: 2, coef: 0.1}, {end_fraction: 1.0, coef: 1.0}]",
            "train.log_every=1", "train.eval_every=4", "train.lr_warmup_steps=2"]


def final_weights(run):
    ckpt = CheckpointStore(run).latest_complete()
    tensors = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        tensors.update(load_file(f))
    return ckpt, tensors


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), f"{k} differs"


def train_losses(run):
    return {m["step"]: m["train/loss"] for m in train_logs(run)}


def stop_and_resume(model_dir, stopped, straight, stop, args, monkeypatch) -> None:
    """Run `args` into `stopped` as if SIGTERM arrived during step `stop`, resume it, and check the per-step losses
    and final weights equal those of the straight run in `straight`, exactly."""
    with monkeypatch.context() as patch:
        preempt_at(patch, stop)
        assert train_tiny(model_dir, stopped, *args) == 0
    assert CheckpointStore(stopped).latest_complete().name == f"step-{stop:08d}"
    assert train_tiny(model_dir, stopped, *args, "--resume") == 0
    assert train_losses(stopped) == train_losses(straight)  # exact, not approximate
    assert_same_weights(final_weights(straight)[1], final_weights(stopped)[1])
