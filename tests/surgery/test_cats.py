"""CATS: per-layer thresholds calibrated on data to a target sparsity; carried by the run's checkpoints (the
activation state), not its recipe."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from sparsetune.data.batches import eval_batches
from sparsetune.evaluation.perplexity import evaluate_held_out
from sparsetune.recipe.schema import relufy_config
from sparsetune.surgery.calibration import calibrate, needs_calibration
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
    thresholds = calibrate(model, eval_batches(data, 4, 4), torch.device("cpu"), total=4, progress=False)
    assert not needs_calibration(model) and len(thresholds) == model.config.num_hidden_layers
    assert activation_spec(model)["thresholds"] == thresholds
    measured = evaluate_held_out(model, data, 4, 4, 1e-3)
    assert measured["sparsity"] == pytest.approx(target, abs=0.02)
    for layer_sparsity in measured["per_layer"]:
        assert layer_sparsity == pytest.approx(target, abs=0.03)
    # on other text of the same kind the sparsity stays close to the target
    other = evaluate_held_out(model, Rows(16, 32, model.config.vocab_size, seed=1), 4, 4, 1e-3)
    assert other["sparsity"] == pytest.approx(target, abs=0.05)


def test_one_quantile_rule_for_every_calibration():
    """quantile_threshold on hand-computed values: 10 distinct values 0.1 .. 1.0, target 0.3 -> the 4th smallest
    (0.4), so exactly 3 of 10 fall below it; CATS (keeps |SiLU(gate)| >= t) and the `thresholds` conversion both use
    it (the CATS path used the k-th smallest before: one value too few zeroed)."""
    from sparsetune.activations import cats, output_aware
    from sparsetune.activations.base import quantile_threshold
    from sparsetune.sparsity import thresholds as conversion

    values = torch.tensor([0.7, 0.1, 0.9, 0.4, 0.3, 1.0, 0.2, 0.6, 0.5, 0.8])
    assert quantile_threshold(values, 0.3) == pytest.approx(0.4)
    assert int((values < quantile_threshold(values, 0.3)).sum()) == 3
    assert quantile_threshold(values, 0.0) == pytest.approx(0.1)  # nothing below the smallest
    assert float(values.max()) < quantile_threshold(values, 1.0)  # everything below: just above the largest
    assert quantile_threshold(values - 2.0, 0.3, floor=0.0) == 0.0
    assert conversion.quantile_threshold is quantile_threshold
    assert cats.quantile_threshold is quantile_threshold and output_aware.quantile_threshold is quantile_threshold


def test_cats_zeroes_exactly_the_target_count_of_the_calibration_values():
    """On a calibration set small enough to be kept whole, each layer zeroes round(target * n) of the n values."""
    import torch.nn.functional as F

    from sparsetune.surgery.sparse_mlp import measuring_pass, sparse_mlps

    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation="cats", target_sparsity=0.37))
    data = Rows(4, 16, model.config.vocab_size, seed=3)
    thresholds = calibrate(model, eval_batches(data, 2, 2), torch.device("cpu"), total=2, progress=False)

    class Gates:
        def __init__(self):
            self.values = {}

        def record(self, layer, activation, mlp_input, gate):
            self.values.setdefault(layer, []).append(F.silu(gate).abs().reshape(-1))

    gates = Gates()
    measuring_pass(model, eval_batches(data, 2, 2), torch.device("cpu"), gates)
    for m, t in zip(sparse_mlps(model), thresholds):
        v = torch.cat(gates.values[m.layer_idx])
        assert int((v < t).sum()) == round(0.37 * v.numel())


@pytest.mark.e2e
def test_training_calibrates_once_and_resume_reuses_the_thresholds(tiny_model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["relufy.activation=cats", "relufy.target_sparsity=0.8", "relufy.calibration_batches=2",
              "train.eval_every=0", "wandb.mode=disabled", "regularizer.type=none"]
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=2", *common) == 0
    assert "cats: calibrated" in capsys.readouterr().out
    first = CheckpointStore(run).latest_complete()
    # what calibration computed is a checkpoint part, not recipe content
    assert yaml.safe_load((first / "recipe.yaml").read_text())["relufy"]["thresholds"] is None
    thresholds = json.loads((first / "activation_state.json").read_text())["activation"]["thresholds"]
    assert len(thresholds) == 2 and all(t > 0 for t in thresholds)
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=3", *common, "--resume") == 0
    out = capsys.readouterr().out
    assert "cats: calibrated" not in out and "resuming from" in out
    resumed = json.loads((CheckpointStore(run).latest_complete() / "activation_state.json").read_text())
    assert resumed["activation"]["thresholds"] == thresholds
    # export and eval put the same thresholds on the model
    out_dir = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out_dir), "--no-eval"]) == 0
    assert json.loads((out_dir / "sparsetune.json").read_text())["activation"]["thresholds"] == thresholds
