"""`eval --no-compensation` / `--compensate` act on the compensation a llama export holds as its down projections'
bias exactly as on the run's checkpoint, where it is a SparseMLP buffer: dropped, or replaced (never added twice)."""

from __future__ import annotations

import json

import pytest

from sparsetune.cli import main
from sparsetune.evaluation.command import EvalArgs, run_eval
from tests.e2e_helpers import train_tiny

pytestmark = pytest.mark.e2e


def test_compensation_flags_on_an_export_that_holds_it_as_a_bias(tiny_model_dirs, tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    assert train_tiny(tiny_model_dirs["llama"], run, "relufy.activation=output_aware", "relufy.target_sparsity=0.6",
                      "regularizer.type=none", "compensation.enabled=true", "train.max_steps=3", "train.eval_every=0",
                      "wandb.mode=disabled") == 0
    assert main(["export", str(run), "--out", str(out), "--no-eval"]) == 0
    assert json.loads((out / "sparsetune.json").read_text())["compensation_in"] == "down_proj.bias"
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True

    def ppl(target, **flags) -> float:
        return run_eval(EvalArgs(str(target), batches=2, **flags)).held_out["perplexity"]

    with_bias = ppl(out)
    assert with_bias == pytest.approx(ppl(run), rel=1e-6)
    dropped = ppl(out, no_compensation=True)
    assert dropped != pytest.approx(with_bias, rel=1e-6)  # the flag changes the export's result
    assert dropped == pytest.approx(ppl(run, no_compensation=True), rel=1e-6)
    # --compensate replaces the bias the export holds, as it replaces the checkpoint's buffer
    assert ppl(out, compensate=True, calibration_batches=2) == pytest.approx(
        ppl(run, compensate=True, calibration_batches=2), rel=1e-6)
