"""CATS: per-layer thresholds calibrated on data to a target sparsity; carried by the run's recipe."""

from __future__ import annotations

import pytest
import torch
import yaml

from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.data.batches import eval_batches
from sparsetune.evaluation.perplexity import evaluate_held_out
from sparsetune.recipe.schema import relufy_config
from sparsetune.surgery.calibration import calibrate_cats, needs_calibration
from sparsetune.surgery.relufy import activation_spec, relufy
from tests.e2e_helpers import train_tiny
from tests.tiny_models import tiny_model


class Rows:
    """Packed-data stand-in: rows of random token ids (what eval_batches reads)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed)).numpy()

    def __len__(self) -> int:
        return len(self.ids)


@pytest.mark.parametrize("target", [0.3, 0.7, 0.9])
def test_calibrated_thresholds_give_the_target_sparsity_on_the_calibration_data(target):
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation="cats", target_sparsity=target))
    assert needs_calibration(model)
    data = Rows(16, 32, model.config.vocab_size, seed=0)
    thresholds = calibrate_cats(model, eval_batches(data, 4, 4), torch.device("cpu"), total=4, progress=False)
    assert not needs_calibration(model) and len(thresholds) == model.config.num_hidden_layers
    assert activation_spec(model)["thresholds"] == thresholds
    measured = evaluate_held_out(model, data, 4, 4, 1e-3)
    assert measured["sparsity"] == pytest.approx(target, abs=0.02)
    for layer_sparsity in measured["per_layer"]:
        assert layer_sparsity == pytest.approx(target, abs=0.03)
    # on other text of the same kind the sparsity stays close to the target
    other = evaluate_held_out(model, Rows(16, 32, model.config.vocab_size, seed=1), 4, 4, 1e-3)
    assert other["sparsity"] == pytest.approx(target, abs=0.05)


@pytest.mark.e2e
def test_training_calibrates_once_and_resume_reuses_the_thresholds(tiny_model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["relufy.activation=cats", "relufy.target_sparsity=0.8", "relufy.calibration_batches=2",
              "train.eval_every=0", "wandb.mode=disabled", "regularizer.type=none"]
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=2", *common) == 0
    assert "cats: calibrated" in capsys.readouterr().out
    saved = yaml.safe_load((CheckpointStore(run).latest_complete() / "recipe.yaml").read_text())
    thresholds = saved["relufy"]["thresholds"]
    assert len(thresholds) == 2 and all(t > 0 for t in thresholds)
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=3", *common, "--resume") == 0
    out = capsys.readouterr().out
    assert "cats: calibrated" not in out and "resuming from" in out
    resumed = yaml.safe_load((CheckpointStore(run).latest_complete() / "recipe.yaml").read_text())
    assert resumed["relufy"]["thresholds"] == thresholds
