"""Dropped-activation compensation: the closed-form bias lowers the MLP output error on held-out tokens, the run
fits it after its last step (or trains it) and resumes exactly, and the export computes what the run computed
(llama: as the down projection's bias, in plain transformers; qwen2: through sparsetune.json)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sparsetune.activations.cats import CATS
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from sparsetune.data.batches import eval_batches
from sparsetune.recipe.schema import relufy_config
from sparsetune.sparsity.compensation import apply_compensation, fit_compensation
from sparsetune.surgery.calibration import calibrate
from sparsetune.surgery.relufy import activation_spec, relufy
from sparsetune.surgery.sparse_mlp import measuring_pass, sparse_mlps
from tests.checkpoint.helpers import stop_and_resume
from tests.e2e_helpers import logs_with, train_tiny
from tests.surgery.test_cats import Rows
from tests.tiny_models import tiny_model


class _Inputs:
    """A sink keeping each layer's MLP inputs and gates (the tokens every layer sees)."""

    def __init__(self):
        self.seen: dict[int, list] = {}

    def record(self, layer, activation, mlp_input, gate):
        self.seen.setdefault(layer, []).append(mlp_input.reshape(-1, mlp_input.shape[-1]))


def output_errors(model, batches) -> list[tuple[float, float]]:
    """Per layer, the mean squared error of the MLP output against SiLU's (the dense function the CATS zeros cut
    from) on the tokens of `batches`: (without the compensation, with it)."""
    sink = _Inputs()
    measuring_pass(model, batches, torch.device("cpu"), sink)
    errors = []
    with torch.no_grad():
        for m in sparse_mlps(model):
            x = torch.cat(sink.seen[m.layer_idx])
            gate, up, down = m.projections()
            dense = down(F.silu(gate(x)) * up(x))
            sparse = down(m.activation(gate(x), up(x)))
            errors.append((float((dense - sparse).pow(2).sum(-1).mean()),
                           float((dense - m.compensate(sparse)).pow(2).sum(-1).mean())))
    return errors


def test_the_bias_lowers_the_mlp_output_error_on_held_out_tokens():
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation="cats", target_sparsity=0.7))
    vocab = model.config.vocab_size
    # 2048 tokens each: the random model's mean drop is small, so the fit needs enough tokens to beat its noise
    calibration = list(eval_batches(Rows(64, 32, vocab, seed=0), 4, 16))
    held_out = list(eval_batches(Rows(64, 32, vocab, seed=1), 4, 16))
    calibrate(model, calibration, torch.device("cpu"), total=4, progress=False)
    fit = fit_compensation(model, calibration, torch.device("cpu"))
    assert fit.tokens == 64 * 32 and all(0 < r < 1 for r in fit.removed)
    apply_compensation(model, fit.biases)
    # on the calibration tokens the bias removes exactly the share it reports (b is the mean dropped output): exact
    # for the first layer, whose inputs no compensation below it changes ...
    (before, after), *_ = output_errors(model, calibration)
    assert after == pytest.approx(before * (1 - fit.removed[0]), rel=1e-4)
    # ... and on other tokens it still lowers the error, in every layer
    assert all(after < before for before, after in output_errors(model, held_out))
    spec = activation_spec(model)
    assert all(torch.equal(torch.tensor(b), f) for b, f in zip(spec["compensation"], fit.biases))
    again = tiny_model("llama", seed=0)
    relufy(again, spec)  # the spec puts the biases back
    assert all(torch.equal(a.compensation, b.compensation) for a, b in zip(sparse_mlps(again), sparse_mlps(model)))
    assert isinstance(sparse_mlps(again)[0].activation, CATS)


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_run_fits_the_bias_after_training_and_the_export_computes_it(tiny_model_dirs, tmp_path, capsys, family):
    from transformers import AutoModelForCausalLM

    from sparsetune.models.build import SparseModel, load_sparse_model

    run, export = tmp_path / "run", tmp_path / "export"
    assert train_tiny(tiny_model_dirs[family], run, "relufy.activation=cats", "relufy.target_sparsity=0.7",
                      "compensation.enabled=true", "compensation.calibration_batches=2", "train.max_steps=3",
                      "train.eval_every=0", "wandb.mode=disabled") == 0
    assert "sparsetune: compensation: step 3: fitted 2 layer biases" in capsys.readouterr().out
    final = logs_with(run, "compensation/removed_error")
    assert len(final) == 1 and 0 < final[0]["compensation/removed_error"] < 1
    ckpt = CheckpointStore(run).latest_complete()
    biases = json.loads((ckpt / "activation_state.json").read_text())["activation"]["compensation"]
    assert main(["export", str(run), "--out", str(export)]) == 0
    spec = json.loads((export / "sparsetune.json").read_text())
    exported = load_sparse_model(export).eval()
    in_run = SparseModel.from_source(ckpt).model.eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, in_run(input_ids=ids).logits)
        for m in sparse_mlps(in_run):
            m.compensation = None
        assert not torch.equal(exported(input_ids=ids).logits, in_run(input_ids=ids).logits)
    if family == "llama":  # the down projection's bias holds it, gate / up biases zero (cats itself is the code's)
        assert "compensation" not in spec["load_activation"] and spec["compensation_in"] == "down_proj.bias"
        plain = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
        assert plain.config.mlp_bias is True
        with torch.no_grad():
            assert torch.allclose(plain(input_ids=ids).logits, exported(input_ids=ids).logits, atol=1e-5)
        for layer, bias in zip(plain.model.layers, biases):
            assert torch.equal(layer.mlp.down_proj.bias.detach(), torch.tensor(bias))
            assert not layer.mlp.gate_proj.bias.any() and not layer.mlp.up_proj.bias.any()
    else:  # qwen2's MLP has no bias: sparsetune.json carries them
        assert spec["load_activation"]["compensation"] == biases
        assert "has no down-projection bias" in (export / "README.md").read_text()


@pytest.mark.e2e
def test_a_trained_bias_is_fitted_at_its_step_trained_and_resumed_exactly(tiny_model_dirs, tmp_path, monkeypatch,
                                                                          capsys):
    run_args = ["relufy.activation=cats", "relufy.target_sparsity=0.7", "compensation.enabled=true",
                "compensation.train=true", "compensation.calibration_batches=2", "anneal.fraction=0.5",
                "train.max_steps=6", "train.log_every=1", "train.eval_every=0", "wandb.mode=disabled"]
    straight = tmp_path / "straight"
    assert train_tiny(tiny_model_dirs["llama"], straight, *run_args) == 0
    assert "sparsetune: compensation: step 3: fitted" in capsys.readouterr().out  # at the annealing's end
    fitted = json.loads((CheckpointStore(straight).latest_complete() / "compensation.json").read_text())["fitted"]
    assert fitted["step"] == 3
    for stop in (2, 4):  # before the fit, and after it (the trained bias and its optimizer state come back)
        stopped = tmp_path / f"stopped{stop}"
        stop_and_resume(tiny_model_dirs["llama"], stopped, straight, stop, run_args, monkeypatch)
        state = [json.loads((CheckpointStore(r).latest_complete() / "activation_state.json").read_text())
                 for r in (straight, stopped)]
        assert state[0] == state[1]
