"""Issue 29, "Nothing silently wrong": inputs sparsetune used to accept, or refuse with a traceback, and messages that
were not true. Each case is made for real (a real tiny export edited on disk, a real recipe, real SIGINTs to a real
child process, a real shell running the printed command, a real umask) and gives one `error:` line naming the file
or key, exit code 2, no traceback; or, for the messages, the true text.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsetune.cli import main
from sparsetune.errors import SparsetuneError
from tests.e2e_helpers import child_env, one_error, preempt_at, train_tiny
from tests.faults.helpers import killed_on_exit, spawn_train, wait_for

pytestmark = pytest.mark.e2e

QUIET = ["train.eval_every=0", "wandb.mode=disabled"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def model(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


# ------------------------------------------------------------------------- 1. eval --target-sparsity
@pytest.mark.parametrize("value", ["1.5", "cats", "0", "-0.1", "nan", "1"])
def test_eval_target_sparsity_outside_0_1_is_one_line(model, capsys, value):
    with pytest.raises(SystemExit) as exc:  # argparse's exit: before any model is loaded
        main(["eval", str(model), "--activation", "output_aware", f"--target-sparsity={value}"])
    said = (rf"expected a number in \(0, 1\), got {re.escape(repr(value))}" if value == "cats"
            else rf"must lie strictly between 0 and 1, got {re.escape(value)}")
    one_error(capsys, exc.value.code, rf"^error: sparsetune eval: argument --target-sparsity: {said} \(see ")


# ------------------------------------------------------------------------- 2. a damaged export sparsetune.json
@pytest.fixture(scope="module")
def oa_export(tiny_model_dirs, tmp_path_factory) -> Path:
    """A real export of a tiny output_aware run: fitted per-layer thresholds and 128-wide score scales in its
    sparsetune.json (2 layers, intermediate size 128, hidden size 64)."""
    root = tmp_path_factory.mktemp("oa")
    assert train_tiny(tiny_model_dirs["llama"], root / "run", *QUIET, "train.max_steps=1",
                      "relufy.activation=output_aware") == 0
    assert main(["export", str(root / "run"), "--out", str(root / "export"), "--no-eval"]) == 0
    return root / "export"


def _edit(change):
    def apply(text: str) -> str:
        spec = json.loads(text)
        change(spec, spec["load_activation"])
        return json.dumps(spec)
    return apply


def _set(key, value):
    return _edit(lambda spec, act: act.__setitem__(key, value))


DAMAGE = [
    ("truncated", lambda text: text[: len(text) // 2], r"sparsetune.json is not valid JSON \(.*line \d+"),
    ("not an object", lambda text: "[1, 2]", r"sparsetune.json must hold a JSON object, got \[1, 2\]"),
    ("no load_activation", _edit(lambda spec, act: spec.pop("load_activation")),
     r"sparsetune.json has no key 'load_activation'"),
    ("load_activation a list", _edit(lambda spec, act: spec.__setitem__("load_activation", [1])),
     r"sparsetune.json: key 'load_activation' must be a JSON object \(a relufy section\), got \[1\]"),
    ("no activation", _edit(lambda spec, act: act.pop("activation")),
     r"sparsetune.json has no key 'load_activation.activation'"),
    ("unknown activation", _set("activation", "gelu"),
     r"sparsetune.json: key 'load_activation.activation' = 'gelu' is not allowed; expected 'silu', 'relu'"),
    ("negative threshold", _edit(lambda spec, act: act["thresholds"].__setitem__(1, -0.5)),
     r"sparsetune.json: load_activation.thresholds must be >= 0"),
    ("NaN threshold", _edit(lambda spec, act: act["thresholds"].__setitem__(0, math.nan)),
     r"sparsetune.json: key 'load_activation.thresholds.0': Input should be a finite number \(got nan\)"),
    ("string threshold", _edit(lambda spec, act: act["thresholds"].__setitem__(1, "0.002")),
     r"sparsetune.json: key 'load_activation.thresholds.1': Input should be a valid number \(got '0.002'\)"),
    ("3 thresholds", _edit(lambda spec, act: act["thresholds"].append(0.1)),
     r"sparsetune.json: key 'load_activation.thresholds' has 3 values but the model has 2 decoder layers"),
    ("1 threshold", _edit(lambda spec, act: act["thresholds"].pop()),
     r"sparsetune.json: key 'load_activation.thresholds' has 1 value but the model has 2 decoder layers"),
    ("scales width 1", _edit(lambda spec, act: act["scales"].__setitem__(0, [1.0])),
     r"sparsetune.json: key 'load_activation.scales\[0\]' has 1 value but the MLP \(intermediate size\) of layer 0 "
     r"has 128"),
    ("scales width 129", _edit(lambda spec, act: act["scales"][1].append(1.0)),
     r"sparsetune.json: key 'load_activation.scales\[1\]' has 129 values but the MLP \(intermediate size\) of "
     r"layer 1 has 128"),
    ("negative scale", _edit(lambda spec, act: act["scales"][1].__setitem__(5, -1.0)),
     r"sparsetune.json: key 'load_activation.scales': layer 1's scale 5 is -1; score scales are norms, >= 0"),
    ("compensation width 3", _set("compensation", [[0.0] * 64, [0.0] * 3]),
     r"sparsetune.json: key 'load_activation.compensation\[1\]' has 3 values but the MLP output \(hidden size\) of "
     r"layer 1 has 64"),
    ("compensation for 1 layer", _set("compensation", [[0.0] * 64]),
     r"sparsetune.json: key 'load_activation.compensation' has 1 value but the model has 2 decoder layers"),
    ("compensation string", _set("compensation", [[0.0, 0.0, "x"], [0.0] * 64]),
     r"sparsetune.json: key 'load_activation.compensation\[0\]\[2\]' = 'x' is not a finite number"),
]


@pytest.mark.parametrize("name, damage, pattern", DAMAGE, ids=[case[0] for case in DAMAGE])
def test_damaged_export_spec_is_one_line_in_eval_analyze_and_load_sparse_model(oa_export, tmp_path, capsys, name,
                                                                                damage, pattern):
    from sparsetune import load_sparse_model

    export = tmp_path / "export"
    shutil.copytree(oa_export, export)
    spec_file = export / "sparsetune.json"
    spec_file.write_text(damage(spec_file.read_text()))
    before = snapshot(export)
    full = rf"^error: {re.escape(str(export))}/{pattern}"
    for argv in (["eval", str(export), "--batches", "1"], ["analyze", str(export), "--batches", "1"]):
        line = one_error(capsys, main(argv), full)
        assert line.endswith("it is written by `sparsetune export`: export the run again"), line
    with pytest.raises(SparsetuneError, match=pattern):
        load_sparse_model(export)
    assert snapshot(export) == before and not (export / "analysis").exists()  # nothing written into it


def test_an_intact_export_still_loads(oa_export):
    from sparsetune import load_sparse_model
    from sparsetune.surgery.relufy import activation_spec

    spec = activation_spec(load_sparse_model(oa_export))
    assert spec["activation"] == "output_aware" and len(spec["thresholds"]) == 2 and len(spec["scales"][0]) == 128


# ------------------------------------------------------------------------- 3. recipe values that do not fit
@pytest.mark.parametrize("overrides, pattern", [
    (["relufy.activation=fatrelu", "relufy.thresholds=[0.1, 0.1, 0.1]"],
     r"recipe key 'relufy.thresholds' has 3 values but the model has 2 decoder layers; give one per layer"),
    (["relufy.activation=cats", "relufy.thresholds=[0.1, 0.1, 0.1, 0.1]"],
     r"recipe key 'relufy.thresholds' has 4 values but the model has 2 decoder layers; give one per layer"),
    (["relufy.activation=output_aware", "relufy.scales=[[1.0], [1.0]]"],
     r"recipe key 'relufy.scales\[0\]' has 1 value but the MLP \(intermediate size\) of layer 0 has 128; give one "
     r"per neuron"),
    (["relufy.activation=output_aware", "relufy.scales=[[1.0], [1.0], [1.0]]"],
     r"recipe key 'relufy.scales' has 3 values but the model has 2 decoder layers"),
], ids=["fatrelu 3 thresholds", "cats 4 thresholds", "scales width 1", "scales for 3 layers"])
def test_recipe_per_layer_values_that_do_not_fit_the_model(model, tmp_path, capsys, overrides, pattern):
    out = tmp_path / "run"
    one_error(capsys, train_tiny(model, out, *QUIET, "train.max_steps=1", *overrides), rf"^error: {pattern}")
    assert not out.exists()  # refused before the run folder was made


@pytest.mark.parametrize("scales, pattern", [
    ("[[0.5, -1.0], [1.0]]", r"recipe key 'relufy.scales': layer 0's scale 1 is -1; score scales are norms, >= 0"),
    ("[[0.5, .nan], [1.0]]", r"recipe key 'relufy.scales.0.1': Input should be a finite number"),
], ids=["negative", "nan"])
def test_recipe_negative_or_nan_scales_are_refused_by_key(capsys, scales, pattern):
    line = one_error(capsys, main(["validate", "quickstart", "relufy.activation=output_aware",
                                   f"relufy.scales={scales}"]), pattern)
    assert "quickstart.yaml" in line


# ------------------------------------------------------------------------- 4a. the calibration's true batch count
def test_calibration_reports_the_micro_batches_it_used(model, tmp_path, capsys):
    assert train_tiny(model, tmp_path / "run", *QUIET, "train.max_steps=1", "data.max_documents=6",
                      "relufy.activation=cats", "relufy.calibration_batches=100000") == 0
    out = capsys.readouterr().out
    sequences = int(re.search(r"(\d+) train / \d+ held-out sequences", out).group(1))
    used = math.ceil(sequences / 8)  # train.micro_batch_size=8 (TINY_TRAIN)
    assert f"sparsity on {used} training micro-batches (all there are; 100000 were asked for)" in out, out
    assert "on 100000 training micro-batches" not in out


# ------------------------------------------------------------------------- 4b. the printed commands, shell-quoted
def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` as a user pastes it into bash, with this venv's `sparsetune` on PATH."""
    env = child_env(WANDB_MODE="disabled")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_resume_and_export_hints_survive_a_path_with_spaces(model, tmp_path, capsys, monkeypatch):
    run = tmp_path / "my runs" / "run 1"
    preempt_at(monkeypatch, 1)
    assert train_tiny(model, run, *QUIET, "train.max_steps=2") == 0
    out = capsys.readouterr().out
    resume = re.search(r"resume with: (.*)$", out, re.M).group(1)
    argv = shlex.split(resume)
    assert f"output_dir={run}" in argv and argv[-1] == "--resume"
    monkeypatch.undo()
    done = _shell(resume, tmp_path)  # the printed command, pasted back
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sparsetune: done at step 2" in done.stdout  # the same run, resumed and finished
    export = re.search(r"export with: (.*)$", done.stdout, re.M).group(1)
    assert shlex.split(export) == ["sparsetune", "export", str(run), "--out", str(run / "export")]


# ------------------------------------------------------------------------- 4c. a second Ctrl-C aborts at once
def test_a_second_ctrl_c_aborts_at_once(model, tmp_path):
    """Two real SIGINTs half a second apart to a real training process (paused in its initial evaluation): the first
    asks for a checkpoint and says a second one aborts; the second aborts, as said."""
    run, sentinel = tmp_path / "run", tmp_path / "in_eval"
    child = spawn_train(model, run, "train.max_steps=3", SPARSETUNE_TEST_PAUSE="eval",
                        SPARSETUNE_TEST_SENTINEL=str(sentinel), SPARSETUNE_TEST_PAUSE_S="120")
    with killed_on_exit(child):
        wait_for(sentinel, child)
        child.send_signal(signal.SIGINT)
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        start = time.monotonic()
        try:
            code, _, err = finish_within(child, 20)
        finally:
            sentinel.unlink(missing_ok=True)
    assert time.monotonic() - start < 20
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT received: saving a checkpoint at the end of this step (press Ctrl-C again to abort at once)" in err
    assert "second SIGINT, aborting now (no checkpoint)" in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step-*"))


def test_copies_of_one_sigterm_count_once_and_a_ctrl_c_then_aborts(model, tmp_path):
    """A scheduler's SIGTERM arriving twice (itself and a launcher's copy) is one request, as its message says; a
    Ctrl-C after it is a person asking again, and aborts."""
    run, sentinel = tmp_path / "run", tmp_path / "in_eval"
    child = spawn_train(model, run, "train.max_steps=3", SPARSETUNE_TEST_PAUSE="eval",
                        SPARSETUNE_TEST_SENTINEL=str(sentinel), SPARSETUNE_TEST_PAUSE_S="120")
    with killed_on_exit(child):
        wait_for(sentinel, child)
        child.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        child.send_signal(signal.SIGTERM)  # a copy: within the 3 s window
        time.sleep(1.0)
        assert child.poll() is None, "a copy of the first SIGTERM aborted the run"
        child.send_signal(signal.SIGINT)
        try:
            code, _, err = finish_within(child, 20)
        finally:
            sentinel.unlink(missing_ok=True)
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert ("SIGTERM received: saving a checkpoint at the end of this step (send it again to abort at once; copies "
            "arriving within 3 s count as this one)") in err
    assert "aborting now (no checkpoint)" in err and err.count("received: saving") == 1


def finish_within(proc: subprocess.Popen, seconds: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the child did not end within {seconds} s of the signal") from None
    return proc.returncode, out, err


# ------------------------------------------------------------------------- 4d. a recipe path that is a folder
def test_recipe_path_that_is_a_folder_says_so(tmp_path, capsys):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.yaml").write_text("output_dir: runs/x\n")
    one_error(capsys, main(["validate", str(folder)]),
              rf"^error: recipe {re.escape(str(folder))} is a folder, not a recipe file \(it holds mine.yaml\); "
              r"name a .yaml file$")
    one_error(capsys, main(["train", str(tmp_path)]), r"is a folder, not a recipe file; name a .yaml file$")


# ------------------------------------------------------------------------- 4e. export --overwrite keeps eval.json
def test_export_overwrite_keeps_the_previous_evaluation(finished_run, tmp_path, capsys):
    out = tmp_path / "export"

    def export() -> str:
        assert main(["export", str(finished_run), "--out", str(out), "--no-eval", "--overwrite"]) == 0
        return capsys.readouterr().out

    def evaluate() -> bytes:
        assert main(["eval", str(out), "--batches", "1", "--batch-size", "1"]) == 0
        capsys.readouterr()
        return (out / "eval.json").read_bytes()

    export()
    first = evaluate()
    said = export()  # replaces the weights eval.json measured
    assert ("--overwrite: kept the previous export's evaluation as eval.json -> eval.previous.json (it measured the "
            "replaced weights, not these)") in said
    assert not (out / "eval.json").exists() and (out / "eval.previous.json").read_bytes() == first
    said = export()  # nothing evaluated since: the earlier result is carried on, and said so
    assert "--overwrite: kept eval.previous.json, the evaluation of an earlier export (not of these weights)" in said
    assert (out / "eval.previous.json").read_bytes() == first
    second = evaluate()
    said = export()
    assert "eval.json -> eval.previous.json" in said and "the older eval.previous.json it replaces is removed" in said
    assert (out / "eval.previous.json").read_bytes() == second


# ------------------------------------------------------------------------- 5. file modes follow the umask
@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask 022", "umask 077"])
def test_every_file_written_gets_the_umask_mode(model, tmp_path, capsys, mask):
    previous = os.umask(mask)
    try:
        run, out = tmp_path / "run", tmp_path / "export"
        assert train_tiny(model, run, *QUIET, "train.max_steps=1", "predictor.enabled=true", "predictor.rank=4") == 0
        assert main(["export", str(run), "--out", str(out), "--no-eval"]) == 0
    finally:
        os.umask(previous)
    files = [p for folder in (run, out) for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    assert {"model.safetensors", "predictors.safetensors"} <= {p.name for p in files}
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~mask}
    assert not wrong, f"expected {oct(0o666 & ~mask)}: {wrong}"
