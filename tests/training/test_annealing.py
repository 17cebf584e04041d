"""Annealed surgery: the MLPs move from SiLU to the target activation over the first part of the run. Step 0
computes the dense model, the end computes the target, and a resume inside the annealing is bitwise."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sparsetune.activations import build_activation
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.recipe.loading import load_recipe
from tests.checkpoint.helpers import stop_and_resume
from tests.e2e_helpers import logs_with, train_logs, train_tiny


@pytest.mark.parametrize("spec", [{"activation": "relu"}, {"activation": "drelu"},
                                  {"activation": "topk", "top_k_fraction": 0.25}])
def test_the_annealed_activation_runs_from_silu_to_the_target(spec):
    act = build_activation(spec)
    gate, up = torch.randn(4, 8, 32), torch.randn(4, 8, 32)
    dense = F.silu(gate) * up
    assert torch.equal(act.annealed(gate, up, 0.0), dense)
    assert torch.equal(act.annealed(gate, up, 1.0), act(gate, up))
    half = act.annealed(gate, up, 0.5)
    if spec["activation"] == "topk":  # the kept share falls: 1 - 0.5 * 0.75 of the neurons at half-way
        assert int((half != 0).sum(-1).max()) == round(0.625 * 32)
    else:
        assert torch.allclose(half, 0.5 * dense + 0.5 * act(gate, up))


def test_the_recipe_defaults_and_the_checks():
    r = load_recipe("quickstart", ["output_dir=/tmp/x"])
    assert r.anneal.fraction == 0.0  # relu: the swap at step 0, as before
    r = load_recipe("quickstart", ["output_dir=/tmp/x", "relufy.activation=output_aware"])
    assert r.anneal.fraction == 0.5 and r.thresholds.target_sparsity == 0.7  # its defaults: ramp, fit at the end
    assert r.anneal.steps(r.train.max_steps) == round(0.5 * r.train.max_steps)
    from sparsetune.errors import SparsetuneError

    with pytest.raises(SparsetuneError, match="converts before the annealing ends"):
        load_recipe("quickstart", ["output_dir=/tmp/x", "relufy.activation=topk", "anneal.fraction=0.6",
                                   "thresholds.target_sparsity=0.8", "thresholds.at_fraction=0.5"])


RUN = ["relufy.activation=relu", "anneal.fraction=0.5", "train.max_steps=6", "train.log_every=1",
       "train.eval_every=3", "wandb.mode=disabled"]


@pytest.mark.e2e
def test_step_0_is_the_dense_model_the_end_the_target_and_resume_inside_is_bitwise(tiny_model_dirs, tmp_path,
                                                                                  monkeypatch):
    annealed, dense = tmp_path / "annealed", tmp_path / "dense"
    assert train_tiny(tiny_model_dirs["llama"], annealed, *RUN) == 0
    assert train_tiny(tiny_model_dirs["llama"], dense, *RUN[2:], "relufy.activation=silu") == 0
    # the first evaluation and the first step's forward are the dense model's, exactly
    first = [logs_with(run, "eval/loss")[0] for run in (annealed, dense)]
    assert first[0]["step"] == 0 and first[0]["eval/loss"] == first[1]["eval/loss"]
    assert train_logs(annealed)[0]["train/lm_loss"] == train_logs(dense)[0]["train/lm_loss"]
    progress = [m["train/anneal_progress"] for m in train_logs(annealed)]
    assert progress == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]  # 3 annealing steps of 6
    final = logs_with(annealed, "eval/sparsity")[-1]
    assert final["step"] == 6 and final["eval/sparsity"] > 0.3  # ReLU's exact zeros from the end of the annealing
    state = json.loads((CheckpointStore(annealed).latest_complete() / "activation_state.json").read_text())
    assert state["activation"] == {"activation": "relu"}  # what the model computes from the annealing's end on

    stop_and_resume(tiny_model_dirs["llama"], tmp_path / "stopped", annealed, 2, RUN, monkeypatch)  # inside it
