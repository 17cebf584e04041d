"""PowerInfer's predictor layout: the files its converter reads, and the same masks as sparsetune's predictors."""

import json

import pytest
import torch

from sparsetune.cli import main
from sparsetune.export.powerinfer import global_threshold, load_powerinfer_masks, powerinfer_layers
from sparsetune.predictors.bank import PredictorBank, load_predictors
from sparsetune.recipe.schema import PredictorSection
from tests.e2e_helpers import train_tiny


def _bank(**cfg) -> PredictorBank:
    torch.manual_seed(0)
    bank = PredictorBank(PredictorSection(enabled=True, rank=4, **cfg), 16, 40, 3, 4, exact_zeros=True)
    for p in bank.neurons.parameters():
        torch.nn.init.normal_(p)
    return bank


@pytest.mark.parametrize("nonlinearity", ["none", "relu"])
@pytest.mark.parametrize("layer_thresholds", [None, [-0.5, -2.0, -0.1], [0.3, 1.0, 2.5]])
def test_powerinfer_layers_reproduce_the_masks(tmp_path, nonlinearity, layer_thresholds):
    from sparsetune.export.powerinfer import write_powerinfer_predictors

    bank = _bank(nonlinearity=nonlinearity, output_bias=False)
    bank.layer_thresholds = layer_thresholds
    folder = write_powerinfer_predictors(bank, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model_0.pt", "model_1.pt", "model_2.pt"]
    state = torch.load(folder / "model_0.pt", weights_only=True)
    hidden = 4 if nonlinearity == "relu" else 8  # a linear map as relu(z) - relu(-z): twice the rank
    assert set(state) == {"fc1.weight", "fc2.weight"}
    assert state["fc1.weight"].shape == (hidden, 16) and state["fc2.weight"].shape == (40, hidden)
    x = torch.randn(50, 16)
    for layer in range(3):
        assert torch.equal(load_powerinfer_masks(folder, layer, x), bank.neuron_mask(layer, x))


def test_what_powerinfer_cannot_hold_is_refused():
    from sparsetune.errors import SparsetuneError

    with pytest.raises(SparsetuneError, match="output bias"):
        powerinfer_layers(_bank())
    with pytest.raises(SparsetuneError, match="nonlinearity=gelu"):
        powerinfer_layers(_bank(output_bias=False, nonlinearity="gelu"))
    with pytest.raises(SparsetuneError, match="lookahead"):
        powerinfer_layers(_bank(output_bias=False, lookahead=True))
    bank = _bank(output_bias=False)
    bank.layer_thresholds = [-1.0, 0.5, 1.0]
    with pytest.raises(SparsetuneError, match="mixed signs"):
        global_threshold(bank)


@pytest.mark.e2e
def test_export_powerinfer_from_a_run(tiny_model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=3", "predictor.enabled=true",
                      "predictor.rank=8", "predictor.output_bias=false", "train.eval_every=0",
                      "wandb.mode=disabled") == 0
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--no-eval", "--powerinfer"]) == 0
    folder = out / "powerinfer_predictors"
    assert json.loads((folder / "config.json").read_text()) == {"sparse_threshold": 0.0}  # sigmoid 0.5
    bank = load_predictors(out)
    x = torch.randn(20, bank.hidden_size)
    for layer in range(bank.num_neuron_predictors):
        assert torch.equal(load_powerinfer_masks(folder, layer, x), bank.neuron_mask(layer, x))
    card = (out / "README.md").read_text()
    assert "convert-hf-to-powerinfer-gguf.py PATH PATH/powerinfer_predictors" in card
    assert "| vLLM, SGLang | no: their Llama MLP refuses" in card and "runs silently wrong" in card
    # predictors with an output bias: one line, nothing written
    biased = tmp_path / "biased"
    assert train_tiny(tiny_model_dirs["llama"], biased, "train.max_steps=1", "predictor.enabled=true",
                      "predictor.rank=8", "train.eval_every=0", "wandb.mode=disabled") == 0
    capsys.readouterr()
    assert main(["export", str(biased), "--out", str(tmp_path / "x"), "--no-eval", "--powerinfer"]) == 2
    assert "predictor.output_bias=false" in capsys.readouterr().err and not (tmp_path / "x").exists()
