"""Every feature under the sharding engines, on CPU over gloo: LoRA (with its own teacher and layer-wise MLP
distillation on its base weights), layer-wise MLP distillation of a full fine-tune (reference MLPs sharded like their
layers), predictor-only training of a frozen sharded model, the predictor-only phase after training, and the in-run
dynamic-activation evaluation, under FSDP2 and DeepSpeed ZeRO-3.

The reference is a 2-process DDP run of the same recipe (the same rows on the same ranks; DDP itself is checked
against one process in test_multiprocess.py): step 1's losses (before any update) and step 0's evaluation, dynamic
figures included, must be equal up to float reduction order, and training must end at its weights (within 1% of how
far training moved them, as the full fine-tunes of test_multiprocess.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sparsetune.checkpoint.store import CheckpointStore
from tests.distributed.test_distributed_faults import held_parameters
from tests.distributed.test_multiprocess import COMMON, assert_same_training, final_weights, launched, sparsetune
from tests.e2e_helpers import logs_with, train_logs, train_steps, train_tiny

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PREDICTORS = ["predictor.enabled=true", "predictor.rank=4", "predictor.dynamic_eval_batches=2"]
LORA = ["peft.method=lora", "peft.lora.r=4", "distill.weight=0.5", "distill.mlp_weight=1.0", *PREDICTORS,
        "predictor.only_steps=1", "train.eval_every=2"]
FULL = ["distill.mlp_weight=1.0", *PREDICTORS]
FROZEN = ["train.freeze_model=true", *PREDICTORS, "train.max_steps=3"]
STEP_KEYS = ("train/loss", "train/lm_loss", "train/reg_loss", "train/distill_loss", "train/mlp_distill_loss",
             "train/predictor_loss")
DYNAMIC_KEYS = ("dense/perplexity", "oracle/perplexity", "oracle/sparsity", "predicted/perplexity",
                "predicted/sparsity")


def assert_same_first_step_and_eval(run, reference) -> None:
    """Step 1 (same weights on both) and the step-0 evaluation equal the DDP run's."""
    ours, ref = train_logs(run)[0], train_logs(reference)[0]
    for key in STEP_KEYS:
        if key in ref:
            assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
    ours, ref = logs_with(run, "eval/perplexity")[0], logs_with(reference, "eval/perplexity")[0]
    assert ours["step"] == ref["step"] == 0
    assert ours["eval/perplexity"] == pytest.approx(ref["eval/perplexity"], rel=1e-4)
    for key in DYNAMIC_KEYS:
        assert ours[f"eval/dynamic/{key}"] == pytest.approx(ref[f"eval/dynamic/{key}"], rel=1e-4), key


def assert_shards(log: str, what: str = "parameters") -> None:
    held = held_parameters(log, what)
    assert held and all(h < 0.6 * t for h, t in held), held  # each rank holds about half


def adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(CheckpointStore(run).latest_complete() / "model" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def ddp_lora(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp_lora") / "run"
    launched(tiny_model_dirs["llama"], run, "ddp", *LORA)
    return run


@pytest.fixture(scope="module")
def ddp_full(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp_full") / "run"
    launched(tiny_model_dirs["llama"], run, "ddp", *FULL)
    return run


@pytest.mark.parametrize("preset", ["fsdp", "zero3"])
def test_lora_with_its_teacher_mlp_distillation_and_predictors_under_sharding(tiny_model_dirs, tmp_path, ddp_lora,
                                                                             preset):
    run = tmp_path / "run"
    first = launched(tiny_model_dirs["llama"], run, preset, *LORA, env={"SPARSETUNE_TEST_PREEMPT_AT_STEP": "2"})
    assert "stopped at step 2" in first.stdout
    second = launched(tiny_model_dirs["llama"], run, preset, *LORA, "--resume")
    assert "resuming from" in second.stdout
    assert "step 5 on: model frozen, predictors only (after" in second.stdout  # the predictor-only phase
    assert train_steps(run) == [1, 2, 3, 4, 5]
    assert_shards(first.stdout)
    assert_same_first_step_and_eval(run, ddp_lora)
    ckpt = CheckpointStore(run).latest_complete()
    assert (ckpt / "model" / "adapter_config.json").is_file()
    assert (ckpt / ("fsdp_optimizer" if preset == "fsdp" else "deepspeed")).is_dir()  # the sharded optimizer state
    ours, ref = adapter(run), adapter(ddp_lora)
    assert ours.keys() == ref.keys() and all("lora_" in k for k in ours)
    init = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in ref.items()}  # B starts at zero
    moved = sum(float((ref[k] - init[k]).double().pow(2).sum()) for k in ref if "lora_B" in k)
    diff = sum(float((ours[k] - ref[k]).double().pow(2).sum()) for k in ref if "lora_B" in k)
    assert moved > 0 and (diff / moved) ** 0.5 < 0.01, (diff, moved)
    final = logs_with(run, "eval/dynamic/predicted/perplexity")[-1]
    assert final["step"] == 5 and final["eval/dynamic/predicted/sparsity"] > 0
    # the export merges the adapter into the base: the same model as the DDP run's export
    from transformers import AutoModelForCausalLM

    outs = {}
    for name, source in (("ours", run), ("ddp", ddp_lora)):
        out = tmp_path / f"export-{name}"
        proc = sparsetune("export", str(source), "--out", str(out), "--no-eval")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(outs["ours"](ids).logits, outs["ddp"](ids).logits, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("preset", ["fsdp", "zero3"])
def test_mlp_distillation_of_a_full_fine_tune_under_sharding(tiny_model_dirs, tmp_path, ddp_full, preset):
    run = tmp_path / "run"
    proc = launched(tiny_model_dirs["llama"], run, preset, *FULL)
    assert_shards(proc.stdout)
    assert train_logs(run)[0]["train/mlp_distill_loss"] > 0
    assert_same_first_step_and_eval(run, ddp_full)
    assert_same_training(final_weights(run), final_weights(ddp_full), tiny_model_dirs["llama"])


@pytest.fixture(scope="module")
def ddp_frozen(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp_frozen") / "run"
    launched(tiny_model_dirs["llama"], run, "ddp", *FROZEN)
    return run


# One engine each for the two runs below (suite time): their engine-specific parts (placing a frozen model as a
# teacher, calling its MLPs one at a time) are also run under the other engine by the tests above.
@pytest.mark.parametrize("preset", ["zero3"])
def test_predictor_only_training_of_a_sharded_frozen_model(tiny_model_dirs, tmp_path, ddp_frozen, preset):
    run = tmp_path / "run"
    proc = launched(tiny_model_dirs["llama"], run, preset, *FROZEN)
    assert "model frozen and sharded as a" in proc.stdout
    assert_shards(proc.stdout)
    ours, ref = train_logs(run), train_logs(ddp_frozen)
    assert [m["step"] for m in ours] == [1, 2, 3]
    for a, b in zip(ours, ref):  # the model never changes: every step's predictor loss is the DDP run's
        assert a["train/predictor_loss"] == pytest.approx(b["train/predictor_loss"], rel=1e-4)
    assert_same_first_step_and_eval(run, ddp_frozen)
    ckpt = CheckpointStore(run).latest_complete()
    weights = final_weights(run)
    assert weights and all(v.numel() > 0 for v in weights.values())  # the frozen model, gathered
    assert (ckpt / "base_model.json").is_file()  # what a sharded resume checks model.path against


@pytest.mark.parametrize("preset", ["fsdp"])
def test_distillation_teacher_and_its_mlps_are_sharded_like_the_student(tiny_model_dirs, tmp_path, ddp_full, preset):
    run = tmp_path / "run"
    proc = launched(tiny_model_dirs["llama"], run, preset, "distill.weight=0.5", "distill.mlp_weight=1.0",
                    "train.max_steps=1")
    teacher = held_parameters(proc.stdout, "distillation teacher parameters")
    student = held_parameters(proc.stdout, "parameters")
    assert len(teacher) == 2 and all(h < 0.6 * t for h, t in teacher), teacher  # each rank holds about half
    assert teacher[0][1] == student[0][1]  # the same model size
    # the sharded teacher computes what a full copy does: step 1's distillation loss (before any update) equals
    # the single-process run's over the same 8 sequences
    single = tmp_path / "single"
    assert train_tiny(tiny_model_dirs["llama"], single, *COMMON, "distill.weight=0.5", "train.max_steps=1",
                      "train.micro_batch_size=8", "wandb.mode=disabled") == 0
    ours = {m["step"]: m for m in logs_with(run, "train/distill_loss")}
    ref = {m["step"]: m for m in logs_with(single, "train/distill_loss")}
    assert ours[1]["train/distill_loss"] > 0
    assert ours[1]["train/distill_loss"] == pytest.approx(ref[1]["train/distill_loss"], rel=1e-4)
    # its MLPs are the layer-wise reference, gathered one at a time: step 1's term equals the DDP run's, whose
    # reference is a full copy of the same pre-surgery MLPs on every rank
    mlp = train_logs(ddp_full)[0]["train/mlp_distill_loss"]
    assert ours[1]["train/mlp_distill_loss"] == pytest.approx(mlp, rel=1e-4)
