"""The memory plan of a launch (launch/plan.py, `sparsetune validate --launch`): every count comes from the model's
config alone and equals what the real modules hold; each engine shards the parts it promises to."""

from __future__ import annotations

import pytest
import torch

from sparsetune.cli import main
from sparsetune.launch.plan import GIB, format_plan, plan_for_recipe
from sparsetune.launch.presets import get_preset
from sparsetune.recipe.loading import load_recipe
from tests.e2e_helpers import one_error
from tests.tiny_models import tiny_config, tiny_model

FP32 = ['train.mixed_precision="no"', "model.dtype=float32", "train.eval_batches=2"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "config.json"
    tiny_config("llama").to_json_file(path)
    return str(path)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def plan(config_file, preset: str, *overrides: str, processes: int = 2):
    recipe = load_recipe("quickstart", [*FP32, *overrides])
    return plan_for_recipe(recipe, get_preset(preset), processes, config_file, on_gpu=False)


def parts(p) -> dict[str, tuple[float, float]]:
    return {part.name: (part.device, part.host) for part in p.parts}


def test_ddp_replicates_everything_counted_from_the_config(config_file, model):
    n = sum(p.numel() for p in model.parameters())
    got = parts(plan(config_file, "ddp"))
    # fp32: weights, gradients and DDP's bucket copy of them, AdamW's two moments: all whole on every rank
    assert got == {"parameters": (4 * n, 0), "gradients": (4 * n, 0), "DDP gradient buckets": (4 * n, 0),
                   "AdamW moments (2 states)": (8 * n, 0)}


def test_sharded_engines_divide_what_they_promise(config_file, model):
    n = sum(p.numel() for p in model.parameters())
    fsdp = parts(plan(config_file, "fsdp", processes=4))
    assert fsdp == {"parameters": (n, 0), "gradients": (n, 0), "AdamW moments (2 states)": (2 * n, 0)}
    zero2 = parts(plan(config_file, "zero2"))
    assert zero2["parameters"] == (4 * n, 0)  # replicated
    assert zero2["gradients"] == zero2["fp32 master weights"] == (2 * n, 0)
    assert zero2["AdamW moments (2 states)"] == (4 * n, 0)
    zero3 = parts(plan(config_file, "zero3"))
    assert zero3["parameters"] == zero3["fp32 master weights"] == (2 * n, 0)
    offload = plan(config_file, "zero3_offload")
    assert parts(offload)["AdamW moments (2 states)"] == (0, 4 * n)  # host memory
    assert offload.model_state == 0 and offload.host == 4 * n * 4 / 2 + 4 * n / 2  # params, grads, master, moments
    assert "host memory per machine" in format_plan(offload)
    assert "estimate_zero3_model_states_mem_needs" in format_plan(offload)
    assert "estimate_training_usage" in format_plan(plan(config_file, "fsdp"))


def test_teacher_references_predictors_and_lora(config_file, model):
    from peft import LoraConfig, get_peft_model

    from sparsetune.predictors.bank import PredictorBank
    from sparsetune.recipe.schema import PredictorSection

    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
    bank = PredictorBank(PredictorSection(enabled=True, rank=8), cfg.hidden_size, cfg.intermediate_size,
                         cfg.num_hidden_layers, cfg.num_attention_heads, exact_zeros=True)
    n_pred = sum(p.numel() for p in bank.parameters())

    got = parts(plan(config_file, "zero3", "distill.weight=0.5", "predictor.enabled=true", "predictor.rank=8"))
    assert got["teacher (distill.weight)"] == (4 * n / 2, 0)  # sharded like the student
    assert got["predictors (weights, grads, AdamW)"] == (16 * n_pred, 0)  # fp32, replicated
    assert got["parameters"] == (4 * n / 2, 0)
    refs = parts(plan(config_file, "fsdp", "distill.weight=0", "distill.mlp_weight=1.0"))
    assert refs["MLP references (distill.mlp_weight)"] == (4 * mlp / 2, 0)
    assert "MLP references (distill.mlp_weight)" not in parts(plan(config_file, "fsdp", "distill.weight=0.5",
                                                                     "distill.mlp_weight=1.0"))

    lora = plan(config_file, "ddp", "peft.method=lora", "peft.lora.r=4", "distill.weight=0.5")
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    adapters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    got = parts(lora)
    assert got["LoRA adapters"] == (4 * adapters, 0) and got["frozen base (LoRA)"] == (4 * n, 0)
    assert got["AdamW moments (2 states)"] == (8 * adapters, 0)  # only the adapters train
    assert "teacher (distill.weight)" not in got  # the LoRA student with its adapters off is the teacher
    assert lora.shape.lora_params == adapters


def test_activations_follow_the_stated_assumptions(config_file):
    base = plan(config_file, "ddp", "data.seq_len=64", "train.micro_batch_size=2")
    acts = {p.name: p.device for p in base.transient}["activations (estimate)"]
    doubled = plan(config_file, "ddp", "data.seq_len=64", "train.micro_batch_size=4")
    assert {p.name: p.device for p in doubled.transient}["activations (estimate)"] == 2 * acts
    ckpt = plan(config_file, "ddp", "data.seq_len=64", "train.micro_batch_size=2", "train.gradient_checkpointing=true")
    assert {p.name: p.device for p in ckpt.transient}["activations (estimate)"] < acts
    assert any("micro-batch 2 x seq_len 64" in a for a in base.assumptions)


def test_validate_prints_the_plan_and_whether_it_fits(config_file, capsys):
    args = ["validate", "quickstart", *FP32, "--launch", "fsdp", "--num-processes", "2", "--model-config", config_file]
    assert main([*args, "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "--launch fsdp on 2 process(es)" in out and "= model state" in out and "fits in 80 GiB" in out
    p = plan(config_file, "fsdp")
    assert main([*args, "--device-memory", f"{p.total / GIB / 2:.9f}"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize("argv, pattern", [
    (["--launch", "zero9", "--num-processes", "2"], r"--launch zero9: unknown preset"),
    (["--launch", "fsdp", "--num-processes", "0"], r"--num-processes: must be at least 1"),
    (["--launch", "fsdp", "--num-processes", "2", "--device-memory", "-1"], r"--device-memory: must be a number"),
    (["--launch", "fsdp"], r"give --num-processes"),
    (["--device-memory", "80"], r"--device-memory plans a launch"),
    (["--launch", "fsdp", "--num-processes", "2", "--model-config", "/nonexistent/config.json"], r"no such file"),
])
def test_plan_usage_errors_are_one_line(argv, pattern, capsys):
    code = 0
    try:
        code = main(["validate", "quickstart", *FP32, *argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    one_error(capsys, code, pattern)


def test_plan_of_the_7b_recipe_fits_8_gpus_under_zero3_and_fsdp():
    recipe = load_recipe("recipes/llama2_7b_multigpu.yaml")
    for preset in ("zero3", "fsdp"):
        p = plan_for_recipe(recipe, get_preset(preset), 8, "recipes/configs/llama2_7b_config.json")
        assert 6.7e9 < p.shape.params < 6.8e9  # Llama-2-7B: 6.74B
        assert p.total < 80 * GIB
    ddp = plan_for_recipe(recipe, get_preset("ddp"), 8, "recipes/configs/llama2_7b_config.json")
    assert ddp.total > 80 * GIB
    assert torch.isfinite(torch.tensor(ddp.total))
