"""output_aware: SwiGLU kept, neurons of low output-aware score zeroed. The per-forward rule (training), the fixed
per-layer thresholds fitted for a target, the gate score's independence from up, a run and its export."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sparsetune.activations.output_aware import OutputAware
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from sparsetune.data.batches import eval_batches
from sparsetune.evaluation.perplexity import evaluate_held_out
from sparsetune.recipe.schema import relufy_config
from sparsetune.sparsity.thresholds import apply_thresholds, fit_thresholds
from sparsetune.surgery.calibration import calibrate, needs_calibration
from sparsetune.surgery.relufy import activation_spec, relufy
from sparsetune.surgery.sparse_mlp import sparse_mlps
from tests.e2e_helpers import logs_with, train_tiny
from tests.surgery.test_cats import Rows
from tests.tiny_models import tiny_model

BATCHES, BATCH, SEQ = 4, 4, 32  # 512 calibration tokens


def scored_model(target: float, score: str = "product"):
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation="output_aware", target_sparsity=target, score=score))
    data = Rows(BATCHES * BATCH, SEQ, model.config.vocab_size, seed=0)
    assert needs_calibration(model)
    calibrate(model, eval_batches(data, BATCH, BATCHES), torch.device("cpu"), total=BATCHES, progress=False)
    assert not needs_calibration(model)
    return model, data


def test_scales_are_the_down_projection_column_norms_and_the_score_is_the_output_contribution():
    model, _ = scored_model(0.5)
    for m in sparse_mlps(model):
        down = m.projections()[2].weight.detach()
        assert torch.allclose(torch.tensor(m.activation.scales), down.norm(dim=0))
        gate, up = torch.randn(3, down.shape[1]), torch.randn(3, down.shape[1])
        # the score is what the neuron adds to the MLP output: ||a_i * W_down[:, i]||
        contribution = (F.silu(gate) * up)[:, None, :] * down[None]  # [tokens, d, m]
        assert torch.allclose(m.activation.scores(gate, up), contribution.norm(dim=1), atol=1e-6)


@pytest.mark.parametrize("target", [0.3, 0.7, 0.9])
def test_the_per_forward_rule_zeroes_the_target_share_and_passes_gradients_straight_through(target):
    act = OutputAware(target, scales=[1.0] * 64)
    gate = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(1))
    up = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    a = act(gate, up)
    n = gate.numel()
    assert float((a == 0).float().mean()) == pytest.approx(round(target * n) / n, abs=1e-9)
    kept = a != 0
    assert torch.equal(a[kept], (F.silu(gate) * up)[kept])  # what is kept is SwiGLU, unchanged
    a.sum().backward()
    assert torch.equal(up.grad, F.silu(gate))  # the gradient of the dense SwiGLU
    # annealed: the zeroed share rises with the progress, none at 0
    for p in (0.0, 0.5):
        with torch.no_grad():
            part = act.annealed(gate, up, p)
        assert float((part == 0).float().mean()) == pytest.approx(round(target * p * n) / n, abs=1e-9)


@pytest.mark.parametrize("score", ["product", "gate"])
@pytest.mark.parametrize("target", [0.6, 0.85])
def test_fixed_thresholds_hit_the_target_per_layer(score, target):
    model, data = scored_model(target, score)
    fits = fit_thresholds(model, list(eval_batches(data, BATCH, BATCHES)), torch.device("cpu"), "output_aware",
                          target_sparsity=target, tokens_per_layer=BATCHES * BATCH * SEQ, batches_count=BATCHES)
    apply_thresholds(model, "output_aware", [f.threshold for f in fits])
    assert all(isinstance(m.activation, OutputAware) and not math.isnan(m.activation.threshold)
               for m in sparse_mlps(model))
    assert activation_spec(model)["thresholds"] == [f.threshold for f in fits]
    measured = evaluate_held_out(model, data, BATCH, BATCHES, 1e-3)
    width = model.config.intermediate_size
    n = BATCHES * BATCH * SEQ * width
    for i, (fit, layer) in enumerate(zip(fits, measured["per_layer"])):
        assert fit.sparsity == pytest.approx(target, abs=1 / n + 1e-9)
        # every token sampled: the first layer (inputs unchanged by thresholds below it) is exact
        assert layer == fit.sparsity if i == 0 else layer == pytest.approx(target, abs=0.03)


def test_the_gate_score_decides_from_the_gate_alone():
    model, _ = scored_model(0.7, "gate")
    act = sparse_mlps(model)[0].activation.with_threshold(0.05)
    gate = torch.randn(4, 10, model.config.intermediate_size, generator=torch.Generator().manual_seed(3))
    ups = [torch.randn_like(gate).abs() + 0.1 for _ in range(2)]  # two different, nowhere-zero ups
    masks = [act(gate, up) != 0 for up in ups]
    assert torch.equal(masks[0], masks[1]) and 0 < float(masks[0].float().mean()) < 1
    assert act.rule_reads == "gate" and OutputAware(0.7).rule_reads == "product"


@pytest.mark.e2e
def test_a_run_trains_ramped_fits_fixed_thresholds_at_the_end_and_exports_them(tiny_model_dirs, tmp_path, capsys):
    from sparsetune.models.build import SparseModel, load_sparse_model

    run, export = tmp_path / "run", tmp_path / "export"
    assert train_tiny(tiny_model_dirs["llama"], run, "relufy.activation=output_aware", "relufy.target_sparsity=0.8",
                      "regularizer.type=none", "train.max_steps=4", "train.eval_every=2", "wandb.mode=disabled") == 0
    out = capsys.readouterr().out
    assert "thresholds: step 4: output_aware -> per-layer output_aware fitted to target sparsity 0.8" in out
    evals = logs_with(run, "eval/sparsity")
    # the annealing (default: half the run) ramps the target: none at step 0, 0.8 * 1/2 after step 2's update
    # (step 2 ran at progress 1/2), the fixed thresholds at the end
    assert [m["step"] for m in evals] == [0, 2, 4]
    assert evals[0]["eval/sparsity"] == 0.0
    assert evals[1]["eval/sparsity"] == pytest.approx(0.8 * 1 / 2, abs=0.01)
    assert evals[2]["eval/sparsity"] == pytest.approx(0.8, abs=0.05)
    state = json.loads((CheckpointStore(run).latest_complete() / "activation_state.json").read_text())["activation"]
    assert state["activation"] == "output_aware" and len(state["thresholds"]) == 2 and len(state["scales"]) == 2
    assert main(["export", str(run), "--out", str(export)]) == 0
    exported = load_sparse_model(export).eval()
    in_run = SparseModel.from_source(CheckpointStore(run).latest_complete()).model.eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, in_run(input_ids=ids).logits)
