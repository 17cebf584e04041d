"""An activation with a calibrated threshold and an export target, both defined in the test tree
(tests/export/toy_plugins.py) and registered from here, train, export (`--target toy`), evaluate and resume with
no edit outside the test tree."""

from __future__ import annotations

import json

import pytest

from sparsetune import activations
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from sparsetune.export import targets
from tests.e2e_helpers import train_tiny
from tests.export import toy_plugins


@pytest.fixture
def toy_registered():
    activations.register(toy_plugins)
    targets.register(toy_plugins.ToyTarget)
    try:
        yield
    finally:
        targets.unregister("toy")
        activations.unregister("toygate")


def test_a_toy_activation_and_target_train_export_evaluate_and_resume(toy_registered, tiny_model_dirs, tmp_path,
                                                                       capsys):
    run, out = tmp_path / "run", tmp_path / "export"
    common = ["relufy.activation=toygate", "relufy.target_sparsity=0.6", "train.eval_every=0", "wandb.mode=disabled",
              "regularizer.type=none"]
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=2", *common) == 0
    assert "toygate: calibrated 2 layer thresholds on 2 training micro-batches" in capsys.readouterr().out
    state = json.loads((CheckpointStore(run).latest_complete() / "activation_state.json").read_text())["activation"]
    thresholds = state["thresholds"]
    assert state["activation"] == "toygate" and len(thresholds) == 2

    assert main(["export", str(run), "--out", str(out), "--target", "toy", "--no-eval"]) == 0
    assert json.loads((out / "toy.json").read_text()) == {"thresholds": thresholds}
    spec = json.loads((out / "sparsetune.json").read_text())
    assert spec["target"] == "toy" and spec["load_activation"]["thresholds"] == thresholds
    assert "toy.json" in spec["files"] and "| toy engine | yes: toy.json |" in (out / "README.md").read_text()
    assert json.loads((out / "sparsity_report.json").read_text())["toy"] == {"file": "toy.json"}

    assert main(["eval", str(out), "--batches", "1", "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["activation"]["thresholds"] == thresholds and result["sparsity"] > 0.3  # the calibrated zeros

    capsys.readouterr()
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=3", *common, "--resume") == 0
    assert "toygate: calibrated" not in capsys.readouterr().out  # the state comes back from the checkpoint
    resumed = json.loads((CheckpointStore(run).latest_complete() / "activation_state.json").read_text())
    assert resumed["activation"]["thresholds"] == thresholds


def test_an_unknown_target_is_refused_in_one_line(tiny_model_dirs, tmp_path, capsys):
    from sparsetune.errors import SparsetuneError
    from sparsetune.export.exporter import export

    with pytest.raises(SparsetuneError, match="--target 'nope' is not an export target; choose one of hf, hf_code"):
        export(tmp_path / "no-run", tmp_path / "x", target="nope")
