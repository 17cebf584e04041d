"""Per-layer exact-zero thresholds: the fit (target sparsity, CETT budget), the recipe section, a run that converts
(and resumes exactly on either side of the conversion), and its export."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sparsetune.activations import build_activation
from sparsetune.activations.cats import CATS
from sparsetune.activations.fatrelu import FATReLU
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from sparsetune.data.batches import eval_batches
from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.perplexity import evaluate_held_out
from sparsetune.recipe.loading import load_recipe
from sparsetune.recipe.schema import relufy_config
from sparsetune.sparsity.cett import cett
from sparsetune.sparsity.thresholds import CONVERSION_FILE, apply_thresholds, fit_thresholds, rule_values
from sparsetune.surgery.relufy import activation_spec, relufy
from sparsetune.surgery.sparse_mlp import patched_mlps, sparse_mlps
from tests.checkpoint.helpers import assert_same_weights, final_weights, train_losses
from tests.e2e_helpers import logs_with, preempt_at, train_steps, train_tiny
from tests.surgery.test_cats import Rows
from tests.tiny_models import tiny_model

BATCHES, BATCH, SEQ = 4, 4, 32  # 512 calibration tokens


def calibration(model) -> list[dict]:
    return list(eval_batches(Rows(BATCHES * BATCH, SEQ, model.config.vocab_size, seed=0), BATCH, BATCHES))


def converted(activation: str, kind: str, tokens: int, **target) -> tuple[torch.nn.Module, list]:
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation=activation, **({"top_k_fraction": 0.5} if activation == "topk" else {})))
    fits = fit_thresholds(model, calibration(model), torch.device("cpu"), kind, tokens_per_layer=tokens,
                          batches_count=BATCHES, **target)
    apply_thresholds(model, kind, [f.threshold for f in fits], [f.sparsity for f in fits])
    return model, fits


@pytest.mark.parametrize("activation, kind, target", [("relu", "fatrelu", 0.8), ("topk", "cats", 0.7)])
@pytest.mark.parametrize("tokens", [512, 128])
def test_fit_hits_the_target_sparsity_per_layer(activation, kind, target, tokens):
    model, fits = converted(activation, kind, tokens, target_sparsity=target)
    cls = FATReLU if kind == "fatrelu" else CATS
    assert all(isinstance(m.activation, cls) for m in sparse_mlps(model))
    measured = evaluate_held_out(model, Rows(BATCHES * BATCH, SEQ, model.config.vocab_size, seed=0), BATCH, BATCHES,
                                 1e-3)
    width = model.config.intermediate_size
    # Fitted on `tokens` of the 512 calibration tokens and measured on all of them: a binomial tolerance on the
    # sampled values. (The fit sees the model before conversion, so a layer's inputs shift a little once the layers
    # below it are thresholded; the first layer's do not, and with every token sampled it is exact.)
    tol = 5 * math.sqrt(target * (1 - target) / (tokens * width))
    for i, (fit, layer) in enumerate(zip(fits, measured["per_layer"])):
        assert fit.sparsity == pytest.approx(target, abs=1 / (tokens * width) + 1e-9)
        assert layer == pytest.approx(target, abs=tol)
        if i == 0 and tokens == BATCHES * BATCH * SEQ:
            assert layer == fit.sparsity


def test_fatrelu_never_goes_below_relu():
    # a target below ReLU's own zeros would need a negative threshold (letting negative gates through): it stays 0
    model, fits = converted("relu", "fatrelu", 512, target_sparsity=0.2)
    assert [f.threshold for f in fits] == [0.0, 0.0] and all(0.4 < f.sparsity < 0.6 for f in fits)


class _Inputs:
    """A sink keeping every layer's MLP input and gate (all tokens)."""

    def __init__(self):
        self.x, self.gate = {}, {}

    def record(self, layer, activation, mlp_input, gate):
        self.x.setdefault(layer, []).append(mlp_input.reshape(-1, mlp_input.shape[-1]))
        self.gate.setdefault(layer, []).append(gate.reshape(-1, gate.shape[-1]))


@pytest.mark.parametrize("activation, kind", [("relu", "fatrelu"), ("topk", "cats")])
@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_cett_budget_fit_keeps_the_mean_cett_within_the_budget(activation, kind, budget):
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation=activation, **({"top_k_fraction": 0.5} if activation == "topk" else {})))
    batches = calibration(model)
    fits = fit_thresholds(model, batches, torch.device("cpu"), kind, cett=budget, tokens_per_layer=512,
                          batches_count=BATCHES)
    inputs = _Inputs()  # every calibration token, recomputed independently of the fit
    with torch.no_grad(), patched_mlps(model, sink=inputs):
        for b in batches:
            model(input_ids=b["input_ids"])
    for fit, mlp in zip(fits, sparse_mlps(model)):
        gate_proj, up_proj, down_proj = mlp.projections()
        x, gate = torch.cat(inputs.x[mlp.layer_idx]), torch.cat(inputs.gate[mlp.layer_idx])
        with torch.no_grad():
            up = up_proj(x)
        a = (F.relu(gate) if kind == "fatrelu" else F.silu(gate)) * up  # the elementwise reference
        mean = float(cett(a, down_proj.weight, fit.threshold, values=rule_values(kind, gate)).mean())
        assert mean <= budget and mean == pytest.approx(fit.cett, abs=1e-5)
        assert mean > budget * 0.9, "the highest threshold within the budget, not just any"
        assert 0 < fit.sparsity < 1


def test_per_layer_fatrelu_spec_round_trips_and_the_scalar_form_is_unchanged():
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation="fatrelu", thresholds=[0.1, 0.3]))
    spec = activation_spec(model)
    assert spec == {"activation": "fatrelu", "thresholds": [0.1, 0.3]}
    assert [build_activation(spec, i).threshold for i in range(2)] == [0.1, 0.3]
    relufy(model, relufy_config(activation="fatrelu", threshold=0.2))
    assert activation_spec(model) == {"activation": "fatrelu", "threshold": 0.2}
    with pytest.raises(SparsetuneError, match="'relufy.thresholds' has 1 value but the model has 2 decoder layers"):
        relufy(model, relufy_config(activation="fatrelu", thresholds=[0.1]))


@pytest.mark.parametrize("overrides, message", [
    (["thresholds.target_sparsity=0.9", "thresholds.cett=0.2"],
     r"set one of thresholds.target_sparsity and thresholds.cett, not both"),
    (["thresholds.cett=1.5"], r"recipe key 'thresholds.cett': Input should be less than 1"),
    (["relufy.activation=drelu", "thresholds.cett=0.2"],
     r"thresholds.kind=auto cannot convert relufy.activation=drelu: fatrelu thresholds fit relu / fatrelu runs"),
    (["relufy.activation=topk", "thresholds.kind=fatrelu", "thresholds.target_sparsity=0.9"],
     r"thresholds.kind=fatrelu cannot convert relufy.activation=topk"),
    (["thresholds.kind=sometimes"], r"'thresholds.kind' = 'sometimes' is not allowed"),
    (["relufy.thresholds=[-1, 0.1]", "relufy.activation=fatrelu"], r"relufy.thresholds must be >= 0"),
])
def test_bad_threshold_recipes_give_one_line(overrides, message):
    with pytest.raises(SparsetuneError, match=message) as info:
        load_recipe("quickstart", overrides)
    assert "\n" not in str(info.value)


def test_the_section_is_off_until_a_target_is_given_and_auto_picks_the_form():
    r = load_recipe("quickstart")
    assert not r.thresholds.enabled
    r = load_recipe("quickstart", ["thresholds.cett=0.2"])
    assert r.thresholds.enabled and r.thresholds.form_for(r.relufy.activation) == "fatrelu"
    r = load_recipe("quickstart", ["relufy.activation=topk", "thresholds.target_sparsity=0.9"])
    assert r.thresholds.form_for(r.relufy.activation) == "cats"


# ---------------------------------------------------------------------------------------------------- a run
RUN = ["relufy.activation=topk", "relufy.top_k_fraction=0.5", "thresholds.target_sparsity=0.6",
       "thresholds.at_fraction=0.5", "thresholds.calibration_batches=2", "thresholds.tokens_per_layer=256",
       "train.max_steps=6", "train.log_every=1", "train.eval_every=0", "wandb.mode=disabled"]


def conversion_record(m: dict) -> dict:
    return {k: v for k, v in m.items() if k == "step" or k.startswith("thresholds/")}


@pytest.mark.e2e
def test_a_run_converts_at_its_step_logs_it_and_resumes_exactly_across_it(tiny_model_dirs, tmp_path, monkeypatch,
                                                                          capsys):
    straight = tmp_path / "straight"
    assert train_tiny(tiny_model_dirs["llama"], straight, *RUN) == 0
    out = capsys.readouterr().out
    assert out.count("sparsetune: thresholds: step 3: topk -> per-layer cats fitted to target sparsity 0.6") == 1
    logged = logs_with(straight, "thresholds/converted_at_step")
    assert len(logged) == 1 and logged[0]["step"] == 4 and logged[0]["thresholds/converted_at_step"] == 3
    rec = logged[0]
    assert rec["thresholds/sparsity_before"] == pytest.approx(0.5, abs=0.01)  # top-k keeps half
    assert rec["thresholds/sparsity_after"] == pytest.approx(0.6, abs=0.05)
    assert rec["thresholds/perplexity_before"] > 0 and rec["thresholds/perplexity_after"] > 0
    assert {k for k in rec if k.startswith("thresholds/threshold_layer/")} == {"thresholds/threshold_layer/00",
                                                                                "thresholds/threshold_layer/01"}
    ckpt = CheckpointStore(straight).latest_complete()
    state = json.loads((ckpt / CONVERSION_FILE).read_text())
    assert state["conversion"]["step"] == 3 and state["conversion"]["kind"] == "cats"
    final = logs_with(straight, "eval/cett_sparsity@0.2")
    assert len(final) == 1 and final[0]["step"] == 6  # the CETT metric comes with the final evaluation
    assert final[0]["eval/sparsity"] > 0.55  # the thresholds stay; L1 during the recovery steps pushes further

    for stop in (3, 4):  # checkpoints just before (step 3: the conversion is the next step's) and just after
        stopped = tmp_path / f"stopped{stop}"
        with monkeypatch.context() as patch:
            preempt_at(patch, stop)
            assert train_tiny(tiny_model_dirs["llama"], stopped, *RUN) == 0
        assert CheckpointStore(stopped).latest_complete().name == f"step-{stop:08d}"
        capsys.readouterr()
        assert train_tiny(tiny_model_dirs["llama"], stopped, *RUN, "--resume") == 0
        resumed_out = capsys.readouterr().out
        assert ("sparsetune: thresholds: step 3:" in resumed_out) == (stop == 3)
        assert train_steps(stopped) == list(range(1, 7))
        assert train_losses(stopped) == train_losses(straight)  # exact, not approximate
        assert_same_weights(final_weights(straight)[1], final_weights(stopped)[1])
        again_logged = logs_with(stopped, "thresholds/converted_at_step")
        assert [conversion_record(m) for m in again_logged] == [conversion_record(m) for m in logged]
        again = json.loads((CheckpointStore(stopped).latest_complete() / CONVERSION_FILE).read_text())
        assert again["conversion"]["thresholds"] == state["conversion"]["thresholds"]


@pytest.mark.e2e
def test_a_training_free_shift_exports_what_the_run_evaluated(tiny_model_dirs, tmp_path, capsys):
    from sparsetune.evaluation.command import EvalArgs, run_eval
    from sparsetune.models.build import SparseModel, load_sparse_model

    run, export = tmp_path / "run", tmp_path / "export"
    assert train_tiny(tiny_model_dirs["llama"], run, "thresholds.cett=0.2", "thresholds.calibration_batches=2",
                      "train.max_steps=3", "train.eval_every=0", "wandb.mode=disabled") == 0
    assert "sparsetune: thresholds: step 3: relu -> per-layer fatrelu fitted to cett 0.2" in capsys.readouterr().out
    final = logs_with(run, "eval/perplexity")[-1]
    conversion = logs_with(run, "thresholds/converted_at_step")
    assert len(conversion) == 1 and conversion[0]["step"] == 3  # logged with the final evaluation
    assert final["eval/perplexity"] == pytest.approx(conversion[0]["thresholds/perplexity_after"], rel=1e-9)
    assert final["eval/cett_sparsity@0.01"] <= final["eval/cett_sparsity@0.2"]
    assert main(["export", str(run), "--out", str(export)]) == 0

    spec = json.loads((export / "sparsetune.json").read_text())
    thresholds = json.loads((CheckpointStore(run).latest_complete() / CONVERSION_FILE).read_text())["conversion"]
    assert spec["load_activation"] == {"activation": "fatrelu", "thresholds": thresholds["thresholds"]}
    assert not spec["plain_transformers_exact"]
    report = json.loads((export / "sparsity_report.json").read_text())
    assert report["thresholds"]["step"] == 3
    assert "per-layer thresholds are in `sparsetune.json`" in (export / "README.md").read_text()

    exported = load_sparse_model(export).eval()
    in_run = SparseModel.from_source(CheckpointStore(run).latest_complete()).model.eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, in_run(input_ids=ids).logits)
    result = run_eval(EvalArgs(target=str(export), batches=2, batch_size=8, device="cpu"))
    assert result.held_out["perplexity"] == pytest.approx(final["eval/perplexity"], rel=1e-6)
    assert set(result.to_json()["cett_sparsity"]) == {"0.01", "0.2"}
    assert result.to_metrics("eval")["eval/cett_sparsity@0.2"] == result.held_out["cett_sparsity"]["0.2"]
