"""Every feature under the sharding engines, on CPU over gloo: LoRA (with its own teacher and layer-wise MLP
distillation on its base weights), layer-wise MLP distillation of a full fine-tune (reference MLPs sharded like their
layers), predictor-only training of a frozen sharded model, the predictor-only phase after training, and the in-run
dynamic-activation evaluation, under FSDP2 and DeepSpeed ZeRO-3.

The full fine-tune is each engine's one shared run (tests/distributed/conftest.py: FULL, stopped at step 2 and
resumed), also asserted on in test_multiprocess.py; its reference is a 2-process DDP run of the same recipe (DDP
itself is checked against one process in test_multiprocess.py and here). The LoRA and frozen-model runs are held to
one process of the global batch. Step 1's losses (before any update) and step 0's evaluation, dynamic figures
included, must be equal up to float reduction order, and training must end at the reference's weights (within 1%
of how far training moved them).
"""

from __future__ import annotations

import pytest
import torch

from sparsetune.checkpoint.store import CheckpointStore
from tests.distributed.launching import (
    FROZEN,
    adapter,
    assert_same_first_step_and_eval,
    assert_same_training,
    assert_shards,
    final_weights,
    held_parameters,
    launched,
)
from tests.e2e_helpers import logs_with, train_logs, train_steps

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.xdist_group("lora")
@pytest.mark.parametrize("preset", ["fsdp", "zero3"])
def test_lora_with_its_teacher_mlp_distillation_and_predictors_under_sharding(runs, preset):
    resumed, single_lora = runs.resumed_lora(preset), runs.single_lora()
    run, first, second = resumed.run, resumed.first, resumed.log[len(resumed.first):]
    assert "stopped at step 2" in first
    assert "resuming from" in second
    assert "step 5 on: model frozen, predictors only (after" in second  # the predictor-only phase
    assert train_steps(run) == [1, 2, 3, 4, 5]
    assert_shards(first)
    assert_same_first_step_and_eval(run, single_lora.run)
    ckpt = CheckpointStore(run).latest_complete()
    assert (ckpt / "model" / "adapter_config.json").is_file()
    assert (ckpt / ("fsdp_optimizer" if preset == "fsdp" else "deepspeed")).is_dir()  # the sharded optimizer state
    ours, ref = adapter(run), adapter(single_lora.run)
    assert ours.keys() == ref.keys() and all("lora_" in k for k in ours)
    init = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in ref.items()}  # B starts at zero
    moved = sum(float((ref[k] - init[k]).double().pow(2).sum()) for k in ref if "lora_B" in k)
    diff = sum(float((ours[k] - ref[k]).double().pow(2).sum()) for k in ref if "lora_B" in k)
    assert moved > 0 and (diff / moved) ** 0.5 < 0.01, (diff, moved)
    final = logs_with(run, "eval/dynamic/predicted/perplexity")[-1]
    assert final["step"] == 5 and final["eval/dynamic/predicted/sparsity"] > 0
    # the export merges the adapter into the base: the same model as the single process's export
    from transformers import AutoModelForCausalLM

    outs = {name: AutoModelForCausalLM.from_pretrained(runs.export(source)).eval()
            for name, source in (("ours", resumed), ("single", single_lora))}
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(outs["ours"](ids).logits, outs["single"](ids).logits, rtol=1e-3, atol=1e-4)


@pytest.mark.xdist_group("full")
@pytest.mark.parametrize("preset", ["fsdp", "zero3"])
def test_mlp_distillation_of_a_full_fine_tune_under_sharding(runs, preset):
    """The engine's run of FULL (stopped at step 2 and resumed; its other assertions in test_multiprocess.py)."""
    resumed, ddp = runs.resumed_full(preset), runs.ddp_full()
    assert_shards(resumed.first)
    assert train_logs(resumed.run)[0]["train/mlp_distill_loss"] > 0
    assert_same_first_step_and_eval(resumed.run, ddp.run)
    assert_same_training(final_weights(resumed.run), final_weights(ddp.run), runs.model)


@pytest.mark.xdist_group("full")
def test_mlp_distillation_under_ddp_logs_its_term_in_the_loss(runs):
    """Layer-wise MLP distillation in a 2-process DDP run (was tests/training/test_mlp_distillation.py's own launch):
    the shared DDP run of FULL carries distill.mlp_weight=1.0 beside the logit distillation at 0.5; every logged step
    has the term, and train/loss adds it with its weight."""
    ddp = runs.ddp_full()
    assert "2 process(es)" in ddp.log and "DDP" in ddp.log
    logs = train_logs(ddp.run)
    assert logs and all(m["train/mlp_distill_loss"] > 0 for m in logs)
    assert "train/distill_loss" in logs[0]
    m = logs[0]
    expected = (m["train/lm_loss"] + m["train/reg_coef"] * m["train/reg_loss"] + 0.5 * m["train/distill_loss"]
                + 1.0 * m["train/mlp_distill_loss"])
    assert m["train/loss"] == pytest.approx(expected, rel=1e-4)
    # each layer's ||dense||^2 is averaged over the ranks: step 1 (same weights) is the loss of one process over the
    # same 8 rows, term and total (a per-rank ratio differed by ~0.5%)
    single = train_logs(runs.single_full().run)[0]
    for key in ("train/mlp_distill_loss", "train/loss"):
        assert m[key] == pytest.approx(single[key], rel=1e-5), key


def test_predictor_only_training_of_a_sharded_frozen_model(runs, tmp_path):
    run = tmp_path / "run"
    proc = launched(runs.model, run, "zero3", *FROZEN)
    single_frozen = runs.single_frozen().run
    assert "model frozen and sharded as a" in proc.stdout
    assert_shards(proc.stdout)
    ours, ref = train_logs(run), train_logs(single_frozen)
    assert [m["step"] for m in ours] == [1, 2, 3]
    for a, b in zip(ours, ref):  # the model never changes: every step's predictor loss is one process's
        assert a["train/predictor_loss"] == pytest.approx(b["train/predictor_loss"], rel=1e-4)
    assert_same_first_step_and_eval(run, single_frozen)
    ckpt = CheckpointStore(run).latest_complete()
    weights = final_weights(run)
    assert weights and all(v.numel() > 0 for v in weights.values())  # the frozen model, gathered
    assert (ckpt / "base_model.json").is_file()  # what a sharded resume checks model.path against


@pytest.mark.xdist_group("full")
@pytest.mark.parametrize("preset", ["fsdp", "zero3"])
def test_distillation_teacher_and_its_mlps_are_sharded_like_the_student(runs, preset):
    """FULL's teacher (distill.weight=0.5) in the engine's shared run; the launch before the stop is read."""
    resumed = runs.resumed_full(preset)
    teacher = held_parameters(resumed.first, "distillation teacher parameters")
    student = held_parameters(resumed.first, "parameters")
    assert len(teacher) == 2 and all(h < 0.6 * t for h, t in teacher), teacher  # each rank holds about half
    assert teacher[0][1] == student[0][1]  # the same model size
    # the sharded teacher computes what a full copy does: step 1's distillation loss (before any update) equals
    # the single-process run's over the same 8 sequences
    ours = {m["step"]: m for m in logs_with(resumed.run, "train/distill_loss")}
    ref = {m["step"]: m for m in logs_with(runs.single_full().run, "train/distill_loss")}
    assert ours[1]["train/distill_loss"] > 0
    assert ours[1]["train/distill_loss"] == pytest.approx(ref[1]["train/distill_loss"], rel=1e-4)
    # its MLPs are the layer-wise reference, gathered one at a time: step 1's term equals the DDP run's, whose
    # reference is a full copy of the same pre-surgery MLPs on every rank
    mlp = train_logs(runs.ddp_full().run)[0]["train/mlp_distill_loss"]
    assert ours[1]["train/mlp_distill_loss"] == pytest.approx(mlp, rel=1e-4)
