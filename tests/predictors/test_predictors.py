import json

import pytest
import torch

import sparsetune
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from sparsetune.predictors.labels import balanced_bce, neuron_labels, top_fraction
from sparsetune.predictors.metrics import ConfusionCounts
from tests.e2e_helpers import logs_with, train_logs, train_tiny
from tests.tiny_models import save_tiny_model


def test_labels_and_balanced_loss():
    a = torch.tensor([[0.0, 0.5, -0.2, 0.0]])
    assert neuron_labels(a, exact_zeros=True, active_fraction=0.5).tolist() == [[False, True, True, False]]
    assert neuron_labels(a, exact_zeros=False, active_fraction=0.25).tolist() == [[False, True, False, False]]
    assert top_fraction(torch.tensor([[3.0, 1.0, 2.0]]), 0.5).tolist() == [[True, False, True]]
    logits, labels = torch.zeros(1, 4), torch.tensor([[True, False, False, False]])
    # positives weighted by negatives/positives = 3: loss = (3 * log 2 + 3 * log 2) / 4
    assert balanced_bce(logits, labels).item() == pytest.approx(6 * torch.log(torch.tensor(2.0)).item() / 4)


def test_confusion_summary():
    c = ConfusionCounts(1)
    predicted = torch.tensor([[True, True, False, False]])
    actual = torch.tensor([[True, False, True, False]])
    c.add(0, predicted, actual)
    s = ConfusionCounts.summary(c.merge_counts())["per_layer"][0]
    assert (s["recall"], s["precision"], s["true_sparsity"], s["predicted_sparsity"]) == (0.5, 0.5, 0.5, 0.5)


def test_mass_recall_weighs_misses_by_importance():
    c = ConfusionCounts(1)
    predicted = torch.tensor([[True, False, True, False]])
    actual = torch.tensor([[True, True, True, False]])
    importance = torch.tensor([[5.0, 1.0, 4.0, 9.0]])  # the inactive neuron's importance does not count
    c.add(0, predicted, actual, importance)
    s = ConfusionCounts.summary(c.merge_counts())["per_layer"][0]
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["mass_recall"] == pytest.approx((5 + 4) / (5 + 1 + 4))  # the missed neuron carried 1 of 10
    c = ConfusionCounts(1)
    c.add(0, predicted, actual)  # without importance every active unit weighs the same
    assert ConfusionCounts.summary(c.merge_counts())["per_layer"][0]["mass_recall"] == pytest.approx(2 / 3)


def test_importance_weighted_bce():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    labels = torch.tensor([[True, True, False, False]])
    # uniform importance: the balanced loss exactly
    assert balanced_bce(logits, labels, torch.ones(1, 4)).item() == pytest.approx(balanced_bce(logits, labels).item())
    # positives weighted pos_weight (2 negatives / 2 positives = 1) times importance / mean positive importance
    imp = torch.tensor([[3.0, 1.0, 7.0, 7.0]])
    w = torch.tensor([[1.5, 0.5, 1.0, 1.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), weight=w)
    assert balanced_bce(logits, labels, imp).item() == pytest.approx(expected.item())


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory, tiny_tokenizer):
    """A tiny ReLU Llama whose gate projections have rank 4: its activation pattern is learnable by a
    rank-8 predictor within the 10% budget."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp("planted") / "m", "llama", tiny_tokenizer, hidden_act="relu")
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    for layer in model.model.layers:
        w = layer.mlp.gate_proj.weight
        layer.mlp.gate_proj.weight.data = (torch.randn(w.shape[0], 4) @ torch.randn(4, w.shape[1])) * 0.15
    model.save_pretrained(folder)
    return folder


@pytest.mark.e2e
def test_predictor_learns_a_planted_pattern_and_reproduces_oracle_perplexity(planted_model, tmp_path):
    run = tmp_path / "pred_only"
    # plain recall on unweighted labels with one global threshold (not the defaults, which trade plain recall of
    # neurons that barely matter for mass recall): what a planted pattern's learnability is read from
    assert train_tiny(planted_model, run, "train.max_steps=150", "train.freeze_model=true", "regularizer.type=none",
                      "predictor.enabled=true", "predictor.rank=8", "predictor.lr=0.02", "train.eval_every=0",
                      "predictor.label_weighting=none", "predictor.target_mass_recall=null",
                      "train.log_every=50", "wandb.mode=disabled", "train.eval_batches=4") == 0
    final = logs_with(run, "eval/perplexity")[-1]
    assert final["eval/predictor_neurons/recall"] > 0.95
    assert final["eval/predictor_neurons/predicted_sparsity"] > 0.3
    oracle, predicted = final["eval/dynamic/oracle/perplexity"], final["eval/dynamic/predicted/perplexity"]
    assert abs(predicted - oracle) / oracle < 0.02
    assert final["eval/dynamic/oracle/perplexity"] == pytest.approx(final["eval/dynamic/dense/perplexity"], rel=1e-5)
    # frozen model: the checkpoint's weights are the original ones
    from safetensors.torch import load_file

    ckpt = CheckpointStore(run).latest_complete()
    before, after = load_file(planted_model / "model.safetensors"), load_file(ckpt / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # exported predictors reload and give the same masks
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--no-eval"]) == 0
    spec = json.loads((out / "predictors.json").read_text())
    assert spec["config"]["rank"] == 8 and spec["neuron_param_fraction"] < 0.10
    assert spec["metrics"]["neurons"]["mean"]["recall"] > 0.95
    assert main(["eval", str(out), "--dynamic", "--batches", "2", "--batch-size", "8",
                 "--json", str(tmp_path / "dyn.json")]) == 0
    dyn = json.loads((tmp_path / "dyn.json").read_text())["dynamic"]
    # no head predictors in this run; the prompt-mask modes come with --dynamic
    assert set(dyn) == {"dense", "oracle", "predicted", "prompt", "continuation_dense", "continuation_oracle",
                        "continuation_best"}
    assert dyn["oracle"]["perplexity"] == pytest.approx(dyn["dense"]["perplexity"], rel=1e-5)
    assert dyn["continuation_oracle"]["perplexity"] == pytest.approx(dyn["continuation_dense"]["perplexity"], rel=1e-5)
    assert abs(dyn["predicted"]["perplexity"] - dyn["oracle"]["perplexity"]) / dyn["oracle"]["perplexity"] < 0.02
    # recall of the masks actually applied, on the same held-out tokens: close to the run's own evaluation
    assert dyn["predicted"]["recall"] == pytest.approx(spec["metrics"]["neurons"]["mean"]["recall"], abs=0.03)
    assert dyn["predicted"]["recall"] <= dyn["predicted"]["mass_recall"] + 0.05 and dyn["predicted"]["mass_recall"] <= 1
    # end-to-end sparse decoding from the export: only predicted neurons computed, same greedy text
    assert main(["eval", str(out), "--generate", "16", "--batches", "2", "--batch-size", "8",
                 "--json", str(tmp_path / "gen.json")]) == 0
    decode = json.loads((tmp_path / "gen.json").read_text())["decode"]
    assert decode["new_tokens"] == 16 and decode["sparse"]["neurons_kept"] < 0.7
    assert decode["greedy_tokens_matching_dense"] >= 0.9
    loaded = sparsetune.load_predictors(out)
    original = sparsetune.load_predictors(ckpt / "predictors")
    x = torch.randn(3, 5, loaded.hidden_size)
    for i in range(loaded.num_neuron_predictors):
        assert torch.equal(loaded.neuron_mask(i, x), original.neuron_mask(i, x))


@pytest.mark.e2e
def test_heads_lookahead_and_lora_with_predictors(tiny_model_dirs, tmp_path):
    run = tmp_path / "lora_heads"
    assert train_tiny(tiny_model_dirs["qwen3"], run, "train.max_steps=4", "peft.method=lora", "peft.lora.r=4",
                      "predictor.enabled=true", "predictor.rank=8", "predictor.heads=true", "predictor.lookahead=true",
                      "train.eval_every=0", "train.log_every=2", "wandb.mode=disabled") == 0
    logs = train_logs(run)
    assert all(m["train/predictor_loss"] > 0 for m in logs)
    assert "train/predictor_heads/recall" in logs[-1] and "train/predictor_neurons/recall" in logs[-1]
    assert 0 < logs[-1]["train/predictor_neurons/mass_recall"] <= 1
    assert "train/predictor_heads_layer/mass_recall/01" in logs[-1]
    final = logs_with(run, "eval/perplexity")[-1]
    for mode in ("dense", "oracle", "predicted", "heads_kv_written", "heads_kv_skipped"):
        assert f"eval/dynamic/{mode}/perplexity" in final
    # qwen3 tiny: 4 query heads over 2 KV heads; a KV entry is skipped only when its whole group is
    assert final["eval/dynamic/heads_kv_skipped/kv_sparsity"] <= final["eval/dynamic/heads_kv_skipped/sparsity"]
    bank = sparsetune.load_predictors(CheckpointStore(run).latest_complete() / "predictors")
    assert bank.num_neuron_predictors == 1 and len(bank.heads) == 2  # lookahead: layer 0 predicts layer 1
    rows = (run / "tradeoff.csv").read_text().splitlines()
    assert "predictor_recall" in rows[0] and "perplexity_predicted" in rows[0]


def test_predictor_budget_is_enforced(tiny_model_dirs, tmp_path, capsys):
    assert train_tiny(tiny_model_dirs["llama"], tmp_path / "r", "predictor.enabled=true", "predictor.rank=64",
                      "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert "predictor.rank=64 gives neuron predictors of" in err and "predictor.max_param_fraction=0.1" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_importance_weighted_predictors_train_and_report_mass_recall(tiny_model_dirs, tmp_path):
    run = tmp_path / "importance"
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=3", "predictor.enabled=true",
                      "predictor.rank=8", "predictor.label_weighting=importance", "predictor.dynamic_eval_batches=0",
                      "train.eval_every=0", "train.log_every=1", "wandb.mode=disabled") == 0
    logs = train_logs(run)
    assert all(m["train/predictor_loss"] > 0 for m in logs)
    final = logs_with(run, "eval/perplexity")[-1]
    layers = [final[f"eval/predictor_neurons_layer/mass_recall/{i:02d}"] for i in range(2)]
    assert all(0 < v <= 1 for v in layers)
    assert final["eval/predictor_neurons/mass_recall"] == pytest.approx(sum(layers) / 2)


def test_threshold_for_target_keeps_the_fewest_highest_logits_that_reach_it():
    from sparsetune.predictors.calibration import threshold_for_target

    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert threshold_for_target(logits, torch.ones(4), 0.5) == 2.0  # the top two of four positives
    assert threshold_for_target(logits, torch.ones(4), 1.0) == 0.0  # all of them
    # by mass: the top logit's neuron alone carries 10 of 13
    assert threshold_for_target(logits, torch.tensor([1.0, 10.0, 1.0, 1.0]), 0.7) == 3.0


@pytest.mark.e2e
@pytest.mark.parametrize("kind, target", [("recall", 0.95), ("mass_recall", 0.99)])
def test_calibrated_thresholds_reach_the_target_on_held_out_tokens(tiny_model_dirs, tmp_path, capsys, kind, target):
    run = tmp_path / kind
    # mass recall 0.99 is the default: `predictor.enabled=true` alone calibrates to it
    asked = [f"predictor.target_{kind}={target}"] if kind == "recall" else []
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=8", "predictor.enabled=true",
                      "predictor.rank=8", *asked, "predictor.calibration_batches=4",
                      "train.eval_every=0", "wandb.mode=disabled") == 0
    assert f"per-layer thresholds calibrated to {kind} {target:g}" in capsys.readouterr().out
    spec = json.loads((CheckpointStore(run).latest_complete() / "predictors" / "predictors.json").read_text())
    assert len(spec["layer_logit_thresholds"]) == 2 and spec["calibration"]["kind"] == kind
    final = logs_with(run, "eval/perplexity")[-1]  # measured on held-out rows, not the calibration batches
    for i in range(2):
        assert final[f"eval/predictor_neurons_layer/{kind}/{i:02d}"] >= target - 0.03, (i, final)
    # eval on the command line recalibrates for another target and reports it
    out = tmp_path / "e.json"
    assert main(["eval", str(run), "--dynamic", "--batches", "2", "--target-recall", "0.5",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["predictor_calibration"]["target"] == 0.5
    assert result["dynamic"]["predicted"]["sparsity"] > final["eval/dynamic/predicted/sparsity"]


def test_best_mask_keeps_the_largest_contributions():
    from sparsetune.evaluation.dynamic import best_mask
    from sparsetune.recipe.schema import relufy_config
    from sparsetune.surgery.relufy import relufy
    from sparsetune.surgery.sparse_mlp import sparse_mlps
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    mlp = relufy(model, relufy_config(activation="relu"))[0]
    x = torch.randn(2, 5, model.config.hidden_size)
    gate, up, down = mlp.projections()
    a = mlp.activation(gate(x), up(x))
    assert torch.equal(best_mask(1.0)(mlp, x), a != 0)  # keeping everything = the exact active set
    half = best_mask(0.25)(mlp, x)
    contribution = a.abs() * down.weight.norm(dim=0)
    kept_min = contribution.masked_fill(~half, float("inf")).min(-1).values
    dropped_max = contribution.masked_fill(half, -1.0).max(-1).values
    assert (kept_min >= dropped_max).all() and (half.sum(-1) <= 32).all()  # 0.25 * 128 neurons
    assert sparse_mlps(model)[0] is mlp


@pytest.mark.e2e
def test_sweep_at_the_end_of_a_run_and_on_the_command_line(tiny_model_dirs, tmp_path):
    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=4", "predictor.enabled=true",
                      "predictor.rank=8", "predictor.sweep_targets=[0.5,0.9,0.999]", "train.eval_every=0",
                      "wandb.mode=disabled") == 0
    sweep = json.loads((run / "sweep.json").read_text())
    assert (run / "sweep.png").stat().st_size > 0
    skipped = [p["skipped"] for p in sweep["neurons"]]
    assert [p["target"] for p in sweep["neurons"]] == [0.5, 0.9, 0.999]
    assert skipped == sorted(skipped, reverse=True)  # a higher target keeps more neurons
    for p in sweep["neurons"]:  # the best masks keep at most as many neurons, and never an inactive one
        assert p["best_skipped"] >= p["skipped"] - 0.01 and p["perplexity_best"] > 0
        # the prompt-derived masks keep as many neurons as the predictor (continuation tokens only)
        assert p["prompt_skipped"] == pytest.approx(p["skipped"], abs=0.01) and p["perplexity_prompt"] > 0
    assert sweep["prompt"]["prompt_fraction"] == 0.5 and sweep["prompt"]["dense_continuation"] > 0
    state = json.loads((CheckpointStore(run).latest_complete() / "trainer_state.json").read_text())
    assert state["last_eval"]["sweep"]["neurons"] == sweep["neurons"]
    out = tmp_path / "cli" / "e.json"
    assert main(["eval", str(run), "--dynamic", "--batches", "2", "--sweep", "0.8,0.95", "--json", str(out)]) == 0
    cli_sweep = json.loads((out.parent / "e-sweep.json").read_text())
    assert [p["target"] for p in cli_sweep["neurons"]] == [0.8, 0.95] and (out.parent / "e-sweep.png").is_file()


@pytest.mark.e2e
def test_mask_aware_phase_changes_training_only_where_enabled_and_resumes_bitwise(tiny_model_dirs, tmp_path,
                                                                                    monkeypatch):
    from tests.e2e_helpers import preempt_at

    base = ["train.max_steps=6", "predictor.enabled=true", "predictor.rank=8", "predictor.sweep_targets=[]",
            "train.eval_every=0", "train.log_every=1", "wandb.mode=disabled", "train.save_every=0"]
    plain, aware, stopped = tmp_path / "plain", tmp_path / "aware", tmp_path / "stopped"
    assert train_tiny(tiny_model_dirs["llama"], plain, *base) == 0
    assert train_tiny(tiny_model_dirs["llama"], aware, *base, "predictor.mask_aware_fraction=0.5") == 0
    a, b = ({m["step"]: m["train/loss"] for m in train_logs(r)} for r in (plain, aware))
    assert [a[s] == b[s] for s in range(1, 7)] == [True, True, True, False, False, False]  # masked from step 4
    with monkeypatch.context() as patch:
        preempt_at(patch, 4)
        assert train_tiny(tiny_model_dirs["llama"], stopped, *base, "predictor.mask_aware_fraction=0.5") == 0
    assert train_tiny(tiny_model_dirs["llama"], stopped, *base, "predictor.mask_aware_fraction=0.5",
                      "--resume") == 0
    assert {m["step"]: m["train/loss"] for m in train_logs(stopped)} == b
    from sparsetune.checkpoint.resume import read_weights

    wa = read_weights(CheckpointStore(aware).latest_complete() / "model")
    ws = read_weights(CheckpointStore(stopped).latest_complete() / "model")
    assert all(torch.equal(wa[k], ws[k]) for k in wa)


@pytest.mark.e2e
def test_predictor_only_continuation_trains_predictors_not_the_model_and_resumes_bitwise(tiny_model_dirs, tmp_path,
                                                                                        monkeypatch):
    """predictor.only_steps: after train.max_steps the model is frozen (weights equal to a run that stopped at
    max_steps) while the predictors keep training; a stop inside the continuation resumes bitwise."""
    from safetensors.torch import load_file

    from sparsetune.checkpoint.resume import read_weights
    from tests.e2e_helpers import preempt_at

    base = ["train.max_steps=4", "predictor.enabled=true", "predictor.rank=8", "predictor.sweep_targets=[]",
            "train.eval_every=0", "train.log_every=1", "wandb.mode=disabled", "train.save_every=0"]
    short, longer, stopped = tmp_path / "short", tmp_path / "longer", tmp_path / "stopped"
    assert train_tiny(tiny_model_dirs["llama"], short, *base) == 0
    assert train_tiny(tiny_model_dirs["llama"], longer, *base, "predictor.only_steps=3") == 0
    logs = {m["step"]: m for m in train_logs(longer)}
    assert sorted(logs) == list(range(1, 8))
    assert [logs[s]["train/lr"] == 0.0 for s in range(2, 8)] == [False] * 3 + [True] * 3  # step 1: LR warmup
    assert {s: m["train/loss"] for s, m in logs.items() if s <= 4} == \
        {m["step"]: m["train/loss"] for m in train_logs(short)}

    def weights(run):
        ckpt = CheckpointStore(run).latest_complete()
        preds = {}
        for f in sorted((ckpt / "predictors").glob("*.safetensors")):
            preds.update(load_file(f))
        return read_weights(ckpt / "model"), preds

    (ms, ps), (ml, pl) = weights(short), weights(longer)
    assert all(torch.equal(ms[k], ml[k]) for k in ms)  # the model did not move in the continuation
    assert ps.keys() == pl.keys() and any(not torch.equal(ps[k], pl[k]) for k in ps)  # the predictors did
    with monkeypatch.context() as patch:
        preempt_at(patch, 6)
        assert train_tiny(tiny_model_dirs["llama"], stopped, *base, "predictor.only_steps=3") == 0
    assert train_tiny(tiny_model_dirs["llama"], stopped, *base, "predictor.only_steps=3", "--resume") == 0
    assert {m["step"]: m["train/loss"] for m in train_logs(stopped)} == \
        {s: m["train/loss"] for s, m in logs.items()}
    mr, pr = weights(stopped)
    assert all(torch.equal(ml[k], mr[k]) for k in ml) and all(torch.equal(pl[k], pr[k]) for k in pl)
