"""Real multi-process runs on CPU over gloo: DDP, DeepSpeed ZeRO-2/3 and FSDP2, launched with `--launch`.

One 2-process DDP run is the reference: a single process with twice the micro-batch must match it per step,
and runs under every other engine (each stopped at step 2 and resumed) must end at its weights. The runs are
made once per session (tests/distributed/conftest.py); those of FSDP2 and ZeRO-3 carry the recipe FULL (a
distillation teacher, layer-wise MLP distillation and predictors on top of the regularized full fine-tune) and are
compared with the DDP run of FULL.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsetune.cli import main
from tests.distributed.launching import (
    STEPS,
    assert_same_training,
    assert_weights_close,
    export_run,
    final_weights,
    held_parameters,
    latest_checkpoint,
    per_step,
)
from tests.e2e_helpers import logs_with, train_steps

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.xdist_group("plain")
def test_ddp_two_processes_equal_one_process_with_twice_the_batch(runs):
    ddp, single = runs.ddp_plain(), runs.single_plain().run
    assert "2 process(es)" in ddp.log and "DDP" in ddp.log
    d, s = per_step(ddp.run), per_step(single)
    assert sorted(d) == list(range(1, STEPS + 1))  # logged once per step: only the main process writes
    for step in d:
        for key in ("train/loss", "train/lm_loss", "train/reg_loss", "train/sparsity"):
            assert d[step][key] == pytest.approx(s[step][key], rel=1e-4, abs=1e-6), (step, key)
    ddp_eval = logs_with(ddp.run, "eval/perplexity")[-1]
    single_eval = logs_with(single, "eval/perplexity")[-1]
    assert ddp_eval["eval/perplexity"] == pytest.approx(single_eval["eval/perplexity"], rel=1e-4)
    assert ddp_eval["eval/sparsity"] == pytest.approx(single_eval["eval/sparsity"], abs=1e-4)
    ckpt = latest_checkpoint(ddp.run)
    assert (ckpt / "rng_state_rank0.json").is_file() and (ckpt / "rng_state_rank1.json").is_file()
    assert_weights_close(final_weights(ddp.run), final_weights(single), atol=1e-5)  # same 16 held-out sequences


@pytest.mark.xdist_group("plain")
def test_ddp_with_gradient_accumulation_equals_the_same_global_batch(runs):
    """Micro-batch 2 x 2 accumulation steps on each of two ranks (two machines over loopback, see below)."""
    run, single = runs.two_machines_accumulating().run, runs.single_plain().run
    d, s = per_step(run), per_step(single)
    assert sorted(d) == sorted(s) == list(range(1, STEPS + 1))
    for step in s:
        for key in ("train/loss", "train/lm_loss", "train/sparsity"):
            assert d[step][key] == pytest.approx(s[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert_weights_close(final_weights(run), final_weights(single), atol=1e-5)


@pytest.mark.xdist_group("plain")
def test_two_machines_over_loopback(runs):
    two = runs.two_machines_accumulating()
    assert "2 process(es)" in two.log
    ckpt = latest_checkpoint(two.run)
    assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == 2


def assert_export_matches_checkpoint(run, out, model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from sparsetune.checkpoint.resume import read_weights

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    # A single-process load of the checkpoint's gathered weights, into the original architecture.
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference.config.hidden_act = "relu"
    for layer in reference.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    missing, unexpected = reference.load_state_dict(read_weights(latest_checkpoint(run) / "model"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    for name, tensor in exported.state_dict().items():
        assert tensor.numel() > 0, name


@pytest.mark.parametrize("preset", [pytest.param("zero2", marks=pytest.mark.xdist_group("plain")),
                                    pytest.param("zero3", marks=pytest.mark.xdist_group("full"))])
def test_deepspeed_zero_trains_resumes_and_exports(runs, tmp_path, preset):
    """ZeRO-2 on the plain recipe, against its DDP run; ZeRO-3 on FULL, against DDP's run of FULL."""
    resumed, ddp = (runs.resumed_plain(preset), runs.ddp_plain()) if preset == "zero2" else \
        (runs.resumed_full(preset), runs.ddp_full())
    assert f"DeepSpeed ZeRO-{preset[-1]}" in resumed.log
    assert train_steps(resumed.run) == list(range(1, STEPS + 1))  # each step logged once across the stop
    if preset == "zero3":  # parameters really partitioned: each rank holds about half
        held = held_parameters(resumed.log)
        assert held and all(h < 0.6 * t for h, t in held), held
    ckpt = latest_checkpoint(resumed.run)
    assert list((ckpt / "deepspeed" / "engine").glob("*optim_states.pt"))  # each rank's optimizer partition
    assert_same_training(final_weights(resumed.run), final_weights(ddp.run), runs.model)
    assert_export_matches_checkpoint(resumed.run, export_run(resumed.run, tmp_path / "export"), runs.model)


@pytest.mark.xdist_group("full")
def test_fsdp2_shards_parameters_resumes_and_exports(runs, tmp_path):
    resumed = runs.resumed_full("fsdp")
    held = held_parameters(resumed.log)
    assert len(held) == 4 and all(abs(h - t / 2) <= 0.05 * t for h, t in held), held  # 2 ranks x 2 launches
    assert train_steps(resumed.run) == list(range(1, STEPS + 1))  # each step logged once across the stop
    ckpt = latest_checkpoint(resumed.run)
    assert (ckpt / "fsdp_optimizer").is_dir() and not (ckpt / "optimizer.pt").exists()
    assert_same_training(final_weights(resumed.run), final_weights(runs.ddp_full().run), runs.model)
    assert_export_matches_checkpoint(resumed.run, export_run(resumed.run, tmp_path / "export"), runs.model)


@pytest.mark.parametrize("preset, overrides, key", [
    ("zero3", ["predictor.enabled=true", "predictor.dynamic_eval_batches=3"], "predictor.dynamic_eval_batches"),
    ("fsdp", ["train.eval_batches=3"], "train.eval_batches"),
    ("zero3", ["thresholds.cett=0.2"], "thresholds.cett"),
    ("fsdp", ["relufy.activation=cats", "compensation.enabled=true"], "compensation.enabled"),
])
def test_impossible_preset_combinations_fail_before_launch(tiny_model_dirs, tmp_path, capsys, preset, overrides,
                                                           key):
    """In this process: the check runs before anything is launched, so no child process is needed to see it."""
    code = main(["train", "quickstart", f"model.path={tiny_model_dirs['llama']}", f"output_dir={tmp_path / 'r'}",
                 *overrides, "--launch", preset, "--num-processes", "2"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], err
    assert "launching" not in out and not (tmp_path / "r").exists()
