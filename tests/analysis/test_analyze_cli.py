"""`sparsetune analyze` and the prompt-mask options of `sparsetune eval` on a tiny saved model."""

import json

import pytest

from sparsetune.cli import main

SMALL = ["--batches", "2", "--batch-size", "2", "--seq-len", "64"]


@pytest.mark.e2e
def test_analyze_writes_the_report_and_logs_it_to_wandb(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", str(tiny_model_dirs["llama"]), "--out", str(out), *SMALL, "--wandb", "offline"]) == 0
    printed = capsys.readouterr().out
    assert "inertia" in printed and f"wrote {out / 'analysis.md'}" in printed
    result = json.loads((out / "analysis.json").read_text())
    assert result["tokens"] == 4 * 64 and len(result["layers"]) == 2
    assert "CETT-20%" in result["active_definition"]  # the tiny model is SiLU: no exact zeros
    assert 0 < result["means"]["active_fraction"] < 1 and 0 < result["means"]["inertia_consecutive"] <= 1
    assert len(result["inertia_by_distance"]["jaccard"]) == 2 and result["inertia_by_distance"]["distances"][0] == 1
    for name in ("sparsity", "inertia", "inertia_heatmap", "history", "prompt_overlap", "heads"):
        assert (out / f"{name}.png").stat().st_size > 0
        assert f"({name}.png)" in (out / "analysis.md").read_text()
    assert list((out / "wandb").glob("offline-run-*"))
    # a model that is not a folder has no default report folder: one line, nothing loaded
    assert main(["analyze", "smollm2-135m"]) == 2
    assert "pass --out DIR" in capsys.readouterr().err


@pytest.mark.e2e
def test_eval_dynamic_reports_prompt_masks_on_continuation_tokens(tiny_model_dirs, tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", str(tiny_model_dirs["llama"]), "--dynamic", *SMALL, "--prompt-fraction", "0.25",
                 "--prompt-mass", "0.9", "--json", str(out)]) == 0
    dyn = json.loads(out.read_text())["dynamic"]
    assert dyn["prompt"]["prompt_fraction"] == 0.25 and dyn["prompt"]["mass"] == 0.9
    assert 0 < dyn["prompt"]["sparsity"] < 1
    assert dyn["continuation_best"]["sparsity"] == pytest.approx(dyn["prompt"]["sparsity"], abs=0.01)
    for mode in ("continuation_dense", "continuation_oracle", "continuation_best"):
        assert dyn[mode]["perplexity"] > 0
    assert main(["eval", str(tiny_model_dirs["llama"]), "--dynamic", "--prompt-keep", "1.5"]) == 2
