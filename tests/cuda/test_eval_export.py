"""`sparsetune eval RUN --dynamic` and `sparsetune export` of a run trained on the GPU (bf16, with predictors).

The reference is the same command on the CPU of the same machine: the GPU's figures must be the CPU's.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsetune.cli import main
from tests.distributed.launching import final_weights
from tests.e2e_helpers import logs_with

pytestmark = [pytest.mark.cuda, pytest.mark.e2e]

EVAL = ["--dynamic", "--batches", "2", "--batch-size", "8"]  # the run's own held-out rows (2 batches of 8)


def eval_json(run, out, *extra: str) -> dict:
    assert main(["eval", str(run), *EVAL, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_dynamic_eval_of_a_gpu_run_equals_the_cpu_eval(bf16_gpu_run, tmp_path):
    run, _ = bf16_gpu_run
    gpu = eval_json(run, tmp_path / "gpu.json")
    cpu = eval_json(run, tmp_path / "cpu.json", "--device", "cpu")
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["what"] == cpu["what"] and gpu["what"].startswith("checkpoint at step")
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-4)
    assert gpu["sparsity"] == pytest.approx(cpu["sparsity"], abs=1e-4)
    # the run's own final evaluation of the same rows ran under bf16 autocast: close, not equal
    assert gpu["perplexity"] == pytest.approx(logs_with(run, "eval/perplexity")[-1]["eval/perplexity"], rel=2e-2)
    dyn, ref = gpu["dynamic"], cpu["dynamic"]
    assert {"dense", "oracle", "predicted"} <= set(dyn) and set(dyn) == set(ref)
    # ReLU's oracle masks skip exact zeros only: the dense perplexity, as on the CPU
    assert dyn["oracle"]["perplexity"] == pytest.approx(dyn["dense"]["perplexity"], rel=1e-5)
    for mode in ("dense", "oracle"):
        assert dyn[mode]["perplexity"] == pytest.approx(ref[mode]["perplexity"], rel=1e-4), mode
    # predicted masks: a neuron whose predictor logit sits on the threshold may fall either way on another device
    assert dyn["predicted"]["perplexity"] == pytest.approx(ref["predicted"]["perplexity"], rel=1e-3)
    assert dyn["predicted"]["sparsity"] == pytest.approx(ref["predicted"]["sparsity"], abs=2e-3)
    assert 0 < dyn["predicted"]["sparsity"] < 1


def test_export_of_a_gpu_run_loads_in_plain_transformers(bf16_gpu_run, tiny_model_dirs, tmp_path):
    run, _ = bf16_gpu_run
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.hidden_act == "relu"
    # the export holds the checkpoint's (fp32 master) weights, bitwise
    trained = final_weights(run)
    exported = plain.state_dict()
    assert set(trained) <= set(exported)
    for name, tensor in trained.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["plain_transformers_exact"] is True and 0 < report["evaluation"]["sparsity"] < 1
    assert (out / "predictors.json").is_file()
    # on the GPU, the plain model's logits are those of the original architecture with the trained weights and ReLU
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    reference.config.hidden_act = "relu"
    for layer in reference.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    missing, unexpected = reference.load_state_dict(trained, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        got = plain.cuda().eval()(ids).logits
        want = reference.cuda().eval()(ids).logits
        on_cpu = plain.cpu()(ids.cpu()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
