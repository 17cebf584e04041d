"""Resume is truthful for every recipe key: a changed key either takes effect from the resumed step, announced with
what it changes, or is refused by name before anything is loaded or written; and a resume on data that changed since
the run started is refused unless asked for (docs/RESUME.md, "What a changed recipe key does on resume").

Each module-level run is trained once and copied for every test that resumes it (a refusal changes nothing, which
each refusal test checks on its copy)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sparsetune.checkpoint.store import MARKER, CheckpointStore
from tests.e2e_helpers import logs_with, one_error, train_logs, train_tiny
from tests.faults.helpers import snapshot, weights

pytestmark = pytest.mark.e2e

QUIET = ["train.eval_every=0", "wandb.mode=disabled", "train.log_every=1"]


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def resume(model: Path, run: Path, step: int, *args: str) -> int:
    """Resume `run` from its checkpoint at `step` with the recipe `args`."""
    return train_tiny(model, run, *args, "--resume", str(ckpt(run, step)))


def progress_after(run: Path, step: int) -> list[float]:
    return [m["train/anneal_progress"] for m in train_logs(run) if m["step"] > step]


def refused(capsys, code: int, key: str, why: str) -> str:
    """Exit 2 with one line naming `key`, its old and new values, and `why`."""
    line = one_error(capsys, code, r"^error: cannot resume from .*: the recipe changed where the checkpoint cannot "
                                   r"follow \(.*\); restore these keys or start a new run in another output_dir$")
    assert re.search(re.escape(key) + r": \S+ -> \S+: " + why, line), line
    return line


# ------------------------------------------------------------------------------------- annealing, thresholds
# relu annealed over the first half (its end: step 3 of 6), fatrelu thresholds fitted after the last step, a
# compensation bias fitted after them, a ProSparse schedule whose stages end at shares of the run; a checkpoint
# after every step.
ANNEALED = ["relufy.activation=relu", "anneal.fraction=0.5", "thresholds.target_sparsity=0.8",
            "thresholds.calibration_batches=2", "compensation.enabled=true", "compensation.calibration_batches=2",
            "regularizer.schedule=prosparse",
            "regularizer.stages=[{end_fraction: 0.5, coef: 0.1}, {end_fraction: 1.0, coef: 1.0}]",
            "train.max_steps=6", "train.save_every=1", "train.keep_checkpoints=6", *QUIET]


@pytest.fixture(scope="module")
def annealed(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("annealed") / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, *ANNEALED) == 0
    assert [m["train/anneal_progress"] for m in train_logs(run)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    return run


def test_a_longer_run_keeps_the_annealing_end_inside_the_annealing(annealed, tiny_model_dirs, tmp_path, capsys):
    """train.max_steps 6 -> 10 at step 2: the annealing used to re-stretch to end at step 5 (progress 2/3 -> 0.4)."""
    run = copy_run(annealed, tmp_path)
    capsys.readouterr()
    assert resume(tiny_model_dirs["llama"], run, 2, *ANNEALED, "train.max_steps=10") == 0
    out = capsys.readouterr().out
    assert "resume: using the new value of train.max_steps: 6 -> 10 (the cosine LR schedule is re-stretched" in out
    assert "resume: anneal: keeps its end at step 3 (progress 0.667 now)" in out
    assert "resume: thresholds: the conversion moves from after the last step (6) to after the last step (10)" in out
    assert "resume: compensation: the biases are fitted after the last step (10)" in out
    assert progress_after(run, 2) == [2 / 3] + [1.0] * 7  # monotone, ends where it always did


def test_a_longer_finished_run_stays_annealed_and_unconverted_keys_take_effect(annealed, tiny_model_dirs, tmp_path,
                                                                               capsys):
    """At step 4 (annealing over, thresholds and bias still to come) with train.max_steps 6 -> 10: the annealing
    used to go back to progress 0.8; thresholds.target_sparsity and compensation.enabled, announced as used, are."""
    run = copy_run(annealed, tmp_path)
    capsys.readouterr()
    assert resume(tiny_model_dirs["llama"], run, 4, *ANNEALED, "train.max_steps=10", "thresholds.target_sparsity=0.6",
                  "compensation.enabled=false") == 0
    out = capsys.readouterr().out
    assert "resume: anneal: keeps its end at step 3 (progress 1 now: it stays finished)" in out
    assert ("resume: regularizer: its stages given by end_fraction move with train.max_steps: coefficient 0.1 at "
            "step 5 (was 0.325)") in out
    assert ("resume: using the new value of thresholds.target_sparsity: 0.8 -> 0.6 (the conversion after the last "
            "step (10) uses it)") in out
    assert "resume: using the new value of compensation.enabled: True -> False (no biases will be fitted)" in out
    assert progress_after(run, 4) == [1.0] * 6
    last = CheckpointStore(run).latest_complete()
    assert last.name == "step-00000010"
    conversion = json.loads((last / "thresholds.json").read_text())["conversion"]
    assert conversion["step"] == 10 and conversion["criterion"] == {"target_sparsity": 0.6}
    assert not (last / "compensation.json").exists()
    assert "compensation" not in json.loads((last / "activation_state.json").read_text())["activation"]


def test_a_longer_converted_run_keeps_its_thresholds_and_bias_and_says_so(annealed, tiny_model_dirs, tmp_path,
                                                                           capsys):
    run = copy_run(annealed, tmp_path)
    capsys.readouterr()
    assert resume(tiny_model_dirs["llama"], run, 6, *ANNEALED, "train.max_steps=7") == 0
    out = capsys.readouterr().out
    assert "resume: anneal: keeps its end at step 3 (progress 1 now: it stays finished)" in out
    assert "resume: thresholds: converted at step 6; the fitted thresholds stay" in out
    assert "resume: compensation: the biases fitted at step 6 stay (they are not fitted again)" in out
    state = [json.loads((ckpt(run, s) / "activation_state.json").read_text())["activation"] for s in (6, 7)]
    assert state[0] == state[1]  # the thresholds and biases the run fitted, unchanged
    assert progress_after(run, 6) == [1.0]


def test_a_new_anneal_fraction_continues_from_the_progress_reached(annealed, tiny_model_dirs, tmp_path, capsys):
    """anneal.fraction 0.5 -> 0.9 at step 2 (progress 2/3): on to 1 at the new end, step 5, never backwards."""
    run = copy_run(annealed, tmp_path)
    capsys.readouterr()
    assert resume(tiny_model_dirs["llama"], run, 2, *ANNEALED, "anneal.fraction=0.9") == 0
    out = capsys.readouterr().out
    assert ("resume: using the new value of anneal.fraction: 0.5 -> 0.9 (the annealing goes on from progress 0.667 "
            "at step 2 to 1 at step 5, linearly)") in out
    assert progress_after(run, 2) == pytest.approx([2 / 3, 2 / 3 + 1 / 9, 2 / 3 + 2 / 9, 1.0], abs=1e-12)
    # a second resume keeps the continued annealing (its state is in the checkpoint)
    assert json.loads((ckpt(run, 6) / "anneal.json").read_text()) == {"start_step": 2, "start_progress": 2 / 3,
                                                                      "end_step": 5}


@pytest.mark.parametrize(("step", "change", "key", "why"), [
    (2, ["anneal.fraction=0.2"], "anneal.fraction",
     r"the annealing would end at step 1, not after the resumed step 2, so its progress would jump from 0.667 to 1 "
     r"at once: choose anneal.fraction >= 0.5 or keep 0.5"),
    (4, ["anneal.fraction=0.8"], "anneal.fraction",
     r"the annealing ended at step 3 \(the MLPs compute relu since\) and cannot start again: keep anneal.fraction=0.5"),
    (1, ["train.max_steps=2"], "train.max_steps",
     r"the run would end before the annealing's end at step 3 \(progress 0.333 now\): keep train.max_steps >= 3"),
    (2, ["train.max_steps=4", "thresholds.at_fraction=0.5"], "thresholds.at_fraction",
     r"the conversion would come at step 2, before the annealing ends at step 3"),
    (6, ["train.max_steps=7", "thresholds.target_sparsity=0.6"], "thresholds.target_sparsity",
     r"the run converted to fatrelu thresholds fitted to \{'target_sparsity': 0.8\} at step 6; they are part of the "
     r"model now: keep thresholds.target_sparsity=0.8"),
    (6, ["train.max_steps=7", "thresholds.target_sparsity=null", "thresholds.cett=0.2"], "thresholds.cett",
     r"the run converted to fatrelu"),
    (6, ["train.max_steps=7", "thresholds.kind=fatrelu"], "thresholds.kind", r"the run converted to fatrelu"),
    (6, ["train.max_steps=7", "thresholds.calibration_batches=4"], "thresholds.calibration_batches",
     r"the run converted"),
    (6, ["train.max_steps=7", "thresholds.tokens_per_layer=64"], "thresholds.tokens_per_layer", r"the run converted"),
    (6, ["train.max_steps=7", "compensation.enabled=false"], "compensation.enabled",
     r"the biases were fitted at step 6 and are part of the model now: keep compensation.enabled=true"),
    (6, ["train.max_steps=7", "compensation.calibration_batches=4"], "compensation.calibration_batches",
     r"the biases were fitted at step 6"),
    (2, ["compensation.train=true", "thresholds.at_fraction=0.5"], "compensation.train",
     r"the trained bias \(compensation.train\) is a parameter of the model and of its optimizer, which the checkpoint "
     r"does not hold: keep compensation.train=false"),
], ids=["anneal.fraction-ends-too-soon", "anneal.fraction-after-its-end", "train.max_steps-before-the-anneal-end",
        "thresholds.at_fraction-before-the-anneal-end", "thresholds.target_sparsity-converted",
        "thresholds.cett-converted", "thresholds.kind-converted", "thresholds.calibration_batches-converted",
        "thresholds.tokens_per_layer-converted", "compensation.enabled-fitted",
        "compensation.calibration_batches-fitted", "compensation.train-switched-on"])
def test_a_change_the_annealed_run_cannot_follow_is_refused_by_name(annealed, tiny_model_dirs, tmp_path, capsys, step,
                                                                    change, key, why):
    run = copy_run(annealed, tmp_path)
    before = snapshot(run)
    refused(capsys, resume(tiny_model_dirs["llama"], run, step, *ANNEALED, *change), key, why)
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------- a trained bias (cats)
TRAINED_BIAS = ["relufy.activation=cats", "relufy.target_sparsity=0.7", "compensation.enabled=true",
                "compensation.train=true", "compensation.calibration_batches=2", "anneal.fraction=0.5",
                "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=2", *QUIET]


@pytest.fixture(scope="module")
def trained_bias(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained_bias") / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, *TRAINED_BIAS) == 0  # annealing ends, bias fitted at step 1
    return run


def test_a_longer_run_fits_the_trained_bias_at_the_annealing_end_it_keeps(trained_bias, tiny_model_dirs, tmp_path,
                                                                         capsys):
    """train.max_steps 2 -> 6 at step 1: the fit used to move to step 3 and the annealing back to progress 1/3."""
    run = copy_run(trained_bias, tmp_path)
    capsys.readouterr()
    assert resume(tiny_model_dirs["llama"], run, 1, *TRAINED_BIAS, "train.max_steps=6") == 0
    out = capsys.readouterr().out
    assert "resume: anneal: keeps its end at step 1 (progress 1 now: it stays finished)" in out
    assert "resume: compensation: the biases are fitted at step 1" in out
    assert "sparsetune: compensation: step 1: fitted" in out
    assert progress_after(run, 1) == [1.0] * 5


@pytest.mark.parametrize("step", [1, 2])
def test_switching_a_trained_bias_off_is_refused_by_name(trained_bias, tiny_model_dirs, tmp_path, capsys, step):
    """compensation.train true -> false used to be announced, then fail as a state-dict mismatch."""
    run = copy_run(trained_bias, tmp_path)
    before = snapshot(run)
    refused(capsys, resume(tiny_model_dirs["llama"], run, step, *TRAINED_BIAS, "train.max_steps=3",
                           "compensation.train=false"),
            "compensation.train", r"the trained bias \(compensation.train\) is a parameter of the model and of its "
                                  r"optimizer, which the checkpoint holds: keep compensation.train=true")
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------- every other key
PREDICTORS = ["predictor.enabled=true", "predictor.rank=4", "train.max_steps=2", *QUIET]


@pytest.fixture(scope="module")
def predictor_run(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("predictor_run") / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, *PREDICTORS) == 0
    return run


# Keys that take effect from the resumed step (step 3 here), changed together in one resume; the assertions below
# read their effects in the run's own files.
TAKES_EFFECT = {
    "distill.weight": "0.5", "distill.temperature": "2.0",
    "distill.mlp_weight": "0.1", "sparsity.near_zero_threshold": "0.01", "train.log_every": "2",
    "train.eval_every": "1", "train.eval_batches": "1", "train.save_every": "1", "train.keep_checkpoints": "3",
    "train.max_grad_norm": "0.5", "train.gradient_checkpointing": "true", "train.max_bad_steps": "3",
    "train.mixed_precision": "'no'", "model.trust_remote_code": "true", "wandb.mode": "offline",
    "wandb.project": "elsewhere", "wandb.name": "renamed", "wandb.tags": "[resumed]",
    "predictor.loss": "focal", "predictor.focal_gamma": "1.0", "predictor.threshold": "0.4",
    "predictor.train_token_fraction": "0.5", "predictor.label_weighting": "none",
    "predictor.dynamic_eval_batches": "1", "predictor.calibration_batches": "2", "predictor.target_recall": "0.9",
    "predictor.sweep_targets": "[]", "predictor.max_param_fraction": "0.2", "predictor.head_active_fraction": "0.4",
    "predictor.silu_active_fraction": "0.2", "predictor.detach_inputs": "false", "predictor.only_steps": "1",
}
APPLIED = {"train.lr": "0.001", "train.lr_warmup_steps": "1", "train.weight_decay": "0.01",
           "train.adam_beta1": "0.85", "train.adam_beta2": "0.99", "predictor.lr": "0.005"}


def test_every_other_key_takes_effect_from_the_resumed_step(predictor_run, tiny_model_dirs, tmp_path, capsys):
    run = copy_run(predictor_run, tmp_path)
    capsys.readouterr()
    changes = {**TAKES_EFFECT, **APPLIED, "train.max_steps": "4", "predictor.mask_aware_fraction": "0.5",
               "regularizer.coef": "5.0", "regularizer.warmup_steps": "4"}
    assert resume(tiny_model_dirs["llama"], run, 2, *PREDICTORS, *(f"{k}={v}" for k, v in changes.items())) == 0
    out = capsys.readouterr().out
    for key in TAKES_EFFECT:
        assert re.search(rf"resume: using the new value of {re.escape(key)}: .* \(takes effect from step 3\)", out), key
    for key in APPLIED:
        assert re.search(rf"resume: using the new value of {re.escape(key)}: .* \(set on the restored", out) or \
            re.search(rf"resume: using the new value of {re.escape(key)}: .* \(the LR schedule", out), key
    for key in ("regularizer.coef: 20.0 -> 5.0", "regularizer.warmup_steps: 10 -> 4"):
        assert (f"resume: using the new value of {key} (the new schedule from step 3 on: coefficient 2.5 there (was "
                "4))") in out
    assert ("resume: using the new value of predictor.mask_aware_fraction: 0.0 -> 0.5 (the mask-aware forward is "
            "from step 3 on (was off))") in out
    after = [m for m in train_logs(run) if m["step"] > 2]
    assert [m["step"] for m in after] == [4, 5]  # train.log_every=2, the end, and predictor.only_steps=1
    assert after[0]["train/reg_coef"] == pytest.approx((2.5 + 3.75) / 2)  # warmup over 4 steps to 5.0
    assert all(m["train/distill_loss"] > 0 and m["train/mlp_distill_loss"] > 0 for m in after[:1])
    assert [m["step"] for m in logs_with(run, "eval/loss")] == [0, 2, 3, 4, 5]  # train.eval_every=1, the final
    assert (ckpt(run, 3) / MARKER).is_file()  # train.save_every=1
    assert any((run / "wandb").glob("offline-run-*"))  # wandb.mode=offline
    assert "per-layer thresholds calibrated to recall 0.9 on 2 training micro-batches" in out
    assert "step 5 on: " in out  # the predictor-only step


def test_a_longer_run_says_where_the_mask_aware_forward_starts(tiny_model_dirs, tmp_path, capsys):
    """predictor.mask_aware_fraction is a share of train.max_steps: a longer run moves its start, announced."""
    args = [*PREDICTORS, "predictor.mask_aware_fraction=0.5", "predictor.dynamic_eval_batches=0",
            "predictor.sweep_targets=[]"]
    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, *args) == 0
    capsys.readouterr()
    assert train_tiny(tiny_model_dirs["llama"], run, *args, "train.max_steps=6", "--resume") == 0
    assert ("resume: predictor: the mask-aware forward is from step 4 on (was from step 2) (it is off until then)"
            in capsys.readouterr().out)


def test_freezing_the_model_takes_effect_and_unfreezing_is_refused(predictor_run, tiny_model_dirs, tmp_path, capsys):
    run = copy_run(predictor_run, tmp_path)
    capsys.readouterr()
    assert resume(tiny_model_dirs["llama"], run, 2, *PREDICTORS, "train.max_steps=3", "train.freeze_model=true") == 0
    assert "resume: using the new value of train.freeze_model: False -> True (takes effect from step 3)" in \
        capsys.readouterr().out
    a, b = weights(ckpt(run, 2)), weights(ckpt(run, 3))
    assert all(bool((a[k] == b[k]).all()) for k in a)  # the model did not train from step 3 on
    before = snapshot(run)
    refused(capsys, resume(tiny_model_dirs["llama"], run, 3, *PREDICTORS, "train.max_steps=4"),
            "train.freeze_model", r"the run trained only the predictors, so the checkpoint holds no optimizer state "
                                  r"for the model")
    assert snapshot(run) == before


@pytest.mark.parametrize("change", [
    "model.dtype=bfloat16", "model.revision=main", "relufy.activation=drelu", "peft.method=lora",
    "data.path=/nonexistent.jsonl", "data.seq_len=32", "data.max_documents=10", "data.text_field=body",
    "data.eval_fraction=0.2", "data.name=other", "data.split=validation", "data.eval_path=/nonexistent.jsonl",
    "data.eval_split=eval", "train.seed=1", "train.micro_batch_size=4", "train.grad_accum_steps=2",
    "predictor.enabled=false", "predictor.rank=8", "predictor.layer_ranks=[4,2]", "predictor.nonlinearity=relu",
    "predictor.lookahead=true",
    "predictor.heads=true", "predictor.head_rank=8", "predictor.output_bias=false", "predictor.input=residual",
    "anneal.fraction=0.5",
])
def test_a_fixed_key_is_refused_by_name_before_anything_is_loaded(predictor_run, tiny_model_dirs, tmp_path, capsys,
                                                                  change):
    run = copy_run(predictor_run, tmp_path)
    before = snapshot(run)
    key = change.split("=")[0]
    why = (r"the run did not anneal \(its MLPs compute relu since step 0\) and an annealing cannot start mid-run"
           if key == "anneal.fraction" else "")
    code = resume(tiny_model_dirs["llama"], run, 2, *PREDICTORS, "train.max_steps=3", change)
    line = one_error(capsys, code, r"^error: cannot resume from .*: the recipe changed where the checkpoint cannot "
                                   r"follow")
    assert f"{key}: " in line and re.search(why, line), line
    assert snapshot(run) == before


def test_a_different_model_path_is_refused_by_name(predictor_run, tiny_model_dirs, tmp_path, capsys):
    run = copy_run(predictor_run, tmp_path)
    before = snapshot(run)
    code = train_tiny(tiny_model_dirs["qwen2"], run, *PREDICTORS, "train.max_steps=3", "--resume")
    line = one_error(capsys, code, r"^error: cannot resume from .*: the recipe changed where the checkpoint cannot "
                                   r"follow \(model.path: ")
    assert str(tiny_model_dirs["qwen2"]) in line
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------- data identity
@pytest.fixture
def data_run(tiny_model_dirs, corpus_texts, tmp_path):
    """A run of 2 steps on a local .jsonl file of 300 documents."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:300]))
    args = [f"data.path={data}", "train.max_steps=2", *QUIET]
    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, *args) == 0
    return run, data, args


def test_a_data_file_changed_in_place_is_refused_then_allowed_by_flag(data_run, tiny_model_dirs, corpus_texts,
                                                                      capsys):
    """The file edited in place: the resume used to go on over other rows (and another held-out split), silently."""
    run, data, args = data_run
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:100]))
    before = snapshot(run)
    capsys.readouterr()
    code = train_tiny(tiny_model_dirs["llama"], run, *args, "train.max_steps=3", "--resume")
    line = one_error(capsys, code, rf"^error: data.path {re.escape(str(data))} changed since the run started "
                                   r"\(fingerprint: training rows (\d+) -> (\d+), sha256 \w{12} -> \w{12}; "
                                   r"held-out rows \d+ -> \d+, sha256 \w{12} -> \w{12}\); resume would train on other "
                                   r"rows and "
                                   r"evaluate on other held-out rows; pass --allow-data-change to continue on the new "
                                   r"data$")
    rows = re.search(r"training rows (\d+) -> (\d+)", line).groups()
    assert int(rows[0]) > int(rows[1])
    assert snapshot(run) == before  # nothing written

    assert train_tiny(tiny_model_dirs["llama"], run, *args, "train.max_steps=3", "--resume",
                      "--allow-data-change") == 0
    out = capsys.readouterr().out
    assert re.search(rf"resume: data.path {re.escape(str(data))} changed since the run started \(fingerprint: "
                     r"training rows .*\); --allow-data-change: from step 3 on the run will train on other rows and "
                     r"evaluate on other held-out rows$", out, re.M), out
    history = [json.loads(ln) for ln in (run / "recipe-history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and history[-1]["changes"][-1].startswith("data: data.path")
    # the new data is the run's data from now on: a plain resume goes on without a word about it
    assert train_tiny(tiny_model_dirs["llama"], run, *args, "train.max_steps=4", "--resume") == 0
    assert "data.path" not in capsys.readouterr().out


@pytest.mark.parametrize("layout", [None, 0])
def test_a_checkpoint_of_another_layout_is_refused_in_one_line(data_run, tiny_model_dirs, tmp_path, capsys, layout):
    """Every checkpoint records the layout it was written in (checkpoint.json); resume, export and eval read only
    this sparsetune's (store.LAYOUT) and name the file and the layout expected, before anything is written."""
    from sparsetune.checkpoint.store import LAYOUT
    from sparsetune.cli import main

    run, _, args = data_run
    last = ckpt(run, 2)
    marker = json.loads((last / MARKER).read_text())
    assert marker["layout"] == LAYOUT
    if layout is None:
        del marker["layout"]
    else:
        marker["layout"] = layout
    (last / MARKER).write_text(json.dumps(marker, indent=1))
    before = snapshot(run)
    found = "no checkpoint layout" if layout is None else f"layout {layout}"
    line = (rf"^error: {re.escape(str(last / MARKER))} records {found}; sparsetune \S+ reads checkpoint layout "
            rf"{LAYOUT} only: continue or export it with the sparsetune that wrote it, or start a new run$")
    capsys.readouterr()
    one_error(capsys, train_tiny(tiny_model_dirs["llama"], run, *args, "train.max_steps=3", "--resume"), line)
    one_error(capsys, main(["export", str(run), "--out", str(tmp_path / "export"), "--no-eval"]), line)
    one_error(capsys, main(["eval", str(last), "--batches", "1"]), line)
    assert snapshot(run) == before and not (tmp_path / "export").exists()
