"""Drive `sparsetune train` / `export` / `eval` end to end on tiny models."""

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from sparsetune.models.build import SparseModel
from tests.e2e_helpers import logs_with, read_wandb_run, train_logs, train_tiny

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def relu_l1_run(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "relu_l1"
    assert train_tiny(tiny_model_dirs["llama"], out, "train.max_steps=30", "regularizer.schedule=constant",
                      "regularizer.coef=0.5", "train.log_every=5", "train.eval_every=10",
                      "wandb.mode=offline") == 0  # test_wandb_offline_run_read_back_has_sparsity_keys reads it
    return out


def test_sparsity_rises_over_a_relu_l1_run(relu_l1_run):
    evals = logs_with(relu_l1_run, "eval/sparsity")
    assert [m["step"] for m in evals] == [0, 10, 20, 30]
    assert evals[-1]["eval/sparsity"] > evals[0]["eval/sparsity"] + 0.1
    logs = train_logs(relu_l1_run)
    assert [m["step"] for m in logs] == [5, 10, 15, 20, 25, 30]
    assert logs[-1]["train/sparsity"] > logs[0]["train/sparsity"]
    for key in ("train/loss", "train/lm_loss", "train/reg_loss", "train/reg_coef", "train/lr", "train/tokens_per_s",
                "train/sparsity", "train/sparsity_layer/00", "train/sparsity_layer/01", "tokens"):
        assert key in logs[0], key
    # loss = lm_loss + coef * reg_loss (no distillation here)
    m = logs[-1]
    assert m["train/loss"] == pytest.approx(m["train/lm_loss"] + 0.5 * m["train/reg_loss"], rel=1e-4)


def test_tradeoff_csv_plot_and_checkpoint(relu_l1_run):
    rows = list(csv.DictReader((relu_l1_run / "tradeoff.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30]
    evals = {m["step"]: m for m in logs_with(relu_l1_run, "eval/sparsity")}
    for r in rows:
        assert float(r["sparsity"]) == pytest.approx(evals[int(r["step"])]["eval/sparsity"])
        assert float(r["perplexity"]) == pytest.approx(evals[int(r["step"])]["eval/perplexity"])
    assert (relu_l1_run / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = CheckpointStore(relu_l1_run).latest_complete()
    assert ckpt.name == "step-00000030"
    assert (relu_l1_run / "checkpoints" / "latest").read_text().strip() == ckpt.name


def test_wandb_offline_run_read_back_has_sparsity_keys(relu_l1_run):
    run_dirs = list((relu_l1_run / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    run = read_wandb_run(run_dirs[0])  # W&B's own reader of the run's .wandb log
    assert len(set(run["run_ids"])) == 1
    keys = set().union(*run["history"])
    # the table and the image are nested values in W&B's history: W&B joins their keys with "."
    for key in ("train/sparsity", "train/sparsity_layer/00", "train/reg_loss", "train/reg_coef", "eval/sparsity",
                "eval/perplexity", "eval/sparsity_layer/01", "tradeoff._type", "tradeoff_plot._type"):
        assert key in keys, key
    logged = {row["_step"]: row["eval/sparsity"] for row in run["history"] if "eval/sparsity" in row}
    local = {m["step"]: m["eval/sparsity"] for m in logs_with(relu_l1_run, "eval/sparsity")}
    assert logged == pytest.approx(local)


def test_export_reloads_in_plain_transformers_with_equal_logits(relu_l1_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(relu_l1_run), "--out", str(out)]) == 0
    trained = SparseModel.from_source(CheckpointStore(relu_l1_run).latest_complete()).model
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.hidden_act == "relu"
    ids = torch.randint(0, plain.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, trained.eval()(ids).logits, rtol=0, atol=0)
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["activation"] == {"activation": "relu"} and report["plain_transformers_exact"] is True
    assert len(report["evaluation"]["per_layer"]) == 2 and 0 < report["evaluation"]["sparsity"] < 1
    assert report["recipe"]["relufy"]["activation"] == "relu"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert "AutoModelForCausalLM.from_pretrained" in (out / "README.md").read_text()
    # `sparsetune eval` on the export measures the same model
    assert main(["eval", str(out), "--batches", "2", "--json", str(tmp_path / "eval.json")]) == 0
    measured = json.loads((tmp_path / "eval.json").read_text())
    assert measured["what"] == "export" and measured["perplexity"] > 1 and len(measured["per_layer"]) == 2


def test_lora_run_merges_into_a_plain_export(tiny_model_dirs, tmp_path):
    run = tmp_path / "lora"
    assert train_tiny(tiny_model_dirs["qwen2"], run, "train.max_steps=6", "peft.method=lora", "peft.lora.r=4",
                      "train.eval_every=0", "wandb.mode=disabled") == 0
    ckpt = CheckpointStore(run).latest_complete()
    assert (ckpt / "model" / "adapter_config.json").is_file()
    adapted = SparseModel.from_source(ckpt, merge_lora=False).model
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA weights were trained"
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--no-eval"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, plain.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, adapted.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in plain.state_dict())


def test_distillation_loss_is_logged(tiny_model_dirs, tmp_path):
    run = tmp_path / "distill"
    assert train_tiny(tiny_model_dirs["mistral"], run, "train.max_steps=2", "train.log_every=1",
                      "distill.weight=1.0", "train.eval_every=0", "wandb.mode=disabled") == 0
    logs = train_logs(run)
    assert all(m["train/distill_loss"] > 0 for m in logs)
    m = logs[0]
    assert m["train/loss"] == pytest.approx(m["train/lm_loss"] + m["train/reg_coef"] * m["train/reg_loss"]
                                            + m["train/distill_loss"], rel=1e-4)


def test_gradient_checkpointing_matches_the_plain_run(tiny_model_dirs, tmp_path):
    """Recomputation inside backward must not count activations twice nor lose the regularizer's gradient."""
    runs = {}
    for gc in (False, True):
        run = tmp_path / f"gc_{gc}"
        assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=3", "train.log_every=1",
                          "train.eval_every=0", "regularizer.schedule=constant", "regularizer.coef=1.0",
                          "wandb.mode=disabled", f"train.gradient_checkpointing={str(gc).lower()}") == 0
        runs[gc] = train_logs(run)
    for plain, ckpt in zip(runs[False], runs[True]):
        for key in ("train/loss", "train/reg_loss", "train/sparsity", "train/sparsity_layer/01"):
            assert ckpt[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key


def test_eval_of_a_run_measures_its_latest_checkpoint(relu_l1_run, tmp_path):
    out = tmp_path / "run_eval.json"
    assert main(["eval", str(relu_l1_run), "--batches", "2", "--batch-size", "8", "--json", str(out)]) == 0
    measured = json.loads(out.read_text())
    assert measured["what"] == "checkpoint at step 30" and measured["activation"] == {"activation": "relu"}
    final_eval = logs_with(relu_l1_run, "eval/sparsity")[-1]
    # the same held-out batches as the run's own final evaluation (2 batches of 8): the same numbers
    assert measured["perplexity"] == pytest.approx(final_eval["eval/perplexity"], rel=1e-5)
    assert measured["sparsity"] == pytest.approx(final_eval["eval/sparsity"], rel=1e-6)
