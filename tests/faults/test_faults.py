"""Fault injection: every way a run, a resume or an export can meet damaged, foreign or full storage.

Each test asserts the one `error:` line (or the notice), the exit code, and that nothing was lost: the files that
were there are still there, byte for byte, and where it applies the resumed run ends bitwise where a straight run
ends. docs/RELIABILITY.md lists these faults with the test that proves each.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from sparsetune.checkpoint.store import MARKER, CheckpointStore, _fsync_and_hash
from sparsetune.cli import main
from tests.e2e_helpers import one_error, run_cli, train_logs, train_steps, train_tiny
from tests.faults.helpers import assert_bitwise, export, snapshot, weights

pytestmark = pytest.mark.e2e

QUIET = ["train.eval_every=0", "wandb.mode=disabled"]


def flip_bytes(path: Path, offset: int = -64) -> None:
    """Same-size corruption: a size check cannot see it."""
    data = bytearray(path.read_bytes())
    for i in range(16):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def model(tiny_model_dirs):
    return tiny_model_dirs["llama"]


# ------------------------------------------------------------------------------------------ output folders
def test_train_refuses_a_folder_sparsetune_did_not_create(model, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    (home / "projects" / "recipe.yaml").write_text("not a sparsetune recipe")
    before = snapshot(home)
    code = train_tiny(model, home, *QUIET, "train.max_steps=1", "--overwrite")
    one_error(capsys, code, r"output_dir .*home refusing to delete it: it holds files sparsetune did not create "
                            r"\(notes.txt, projects\)")
    code = train_tiny(model, home, *QUIET, "train.max_steps=1")
    one_error(capsys, code, r"refusing to write into it")
    code = train_tiny(model, home, *QUIET, "train.max_steps=1", "--resume")
    one_error(capsys, code, r"holds no sparsetune run to resume")
    assert snapshot(home) == before


def test_output_dir_dot_in_a_home_folder_is_refused(model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1\n")
    proc = run_cli("train", "quickstart", f"model.path={model}", "output_dir=.", "--overwrite", cwd=home)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"^error: output_dir \. refusing to delete it: .*\.bashrc", proc.stderr, re.M), proc.stderr
    assert (home / ".bashrc").read_text() == "export X=1\n" and sorted(p.name for p in home.iterdir()) == [".bashrc"]


def test_output_dir_that_is_a_file(model, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("data")
    one_error(capsys, train_tiny(model, target, *QUIET, "--overwrite"), r"output_dir .* exists and is not a folder")
    assert target.read_text() == "data"


def test_overwrite_clears_only_what_the_run_wrote(model, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(model, run, *QUIET, "train.max_steps=2") == 0
    (run / "my_analysis.ipynb").write_text("{}")
    (run / "export").mkdir()
    (run / "export" / "model.gguf").write_bytes(b"GGUF")
    capsys.readouterr()
    assert train_tiny(model, run, *QUIET, "train.max_steps=1", "--overwrite") == 0
    out = capsys.readouterr().out
    assert "kept what the run did not write: export, my_analysis.ipynb" in out
    assert (run / "my_analysis.ipynb").read_text() == "{}" and (run / "export" / "model.gguf").read_bytes() == b"GGUF"
    assert train_steps(run) == [1]  # the old run's steps are gone
    assert CheckpointStore(run).latest_name() == "step-00000001" and (run / "sparsetune-run.json").is_file()


def test_a_run_folder_without_its_marker_is_neither_cleared_nor_resumed(model, tmp_path, capsys):
    """A run's files copied by hand without sparsetune-run.json: nothing says sparsetune wrote them."""
    run = tmp_path / "run"
    assert train_tiny(model, run, *QUIET, "train.max_steps=1") == 0
    (run / "sparsetune-run.json").unlink()
    before = snapshot(run)
    one_error(capsys, train_tiny(model, run, *QUIET, "train.max_steps=1", "--overwrite"),
              r"^error: output_dir .* refusing to delete it: it holds files sparsetune did not create \(checkpoints, "
              r".*\) and no sparsetune-run.json; choose a new or empty output_dir$")
    one_error(capsys, train_tiny(model, run, *QUIET, "train.max_steps=2", "--resume"),
              r"^error: output_dir .* cannot take a resumed run: it holds files sparsetune did not create")
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------ export folders
@pytest.mark.parametrize("where, pattern", [
    ("run", r"--out .* contains the run being exported"),
    ("parent", r"--out .* contains the run being exported"),
    ("checkpoints", r"--out .* is inside the run's checkpoints"),
])
def test_export_into_the_run_it_exports_is_refused(finished_run, capsys, where, pattern):
    out = {"run": finished_run, "parent": finished_run.parent,
           "checkpoints": finished_run / "checkpoints" / "exported"}[where]
    before = snapshot(finished_run)
    one_error(capsys, export(finished_run, out, "--overwrite"), pattern)
    assert snapshot(finished_run) == before


def test_export_overwrite_replaces_only_an_earlier_export(finished_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    one_error(capsys, export(finished_run, foreign, "--overwrite"), r"is not a sparsetune export .* refusing")
    assert (foreign / "thesis.tex").read_text() == "mine"

    out = tmp_path / "export"
    assert export(finished_run, out) == 0
    spec = json.loads((out / "sparsetune.json").read_text())
    assert "config.json" in spec["files"] and "README.md" in spec["files"]
    one_error(capsys, export(finished_run, out), r"export folder .* exists and is not empty; pass --overwrite")
    (out / "model.q4.gguf").write_bytes(b"GGUF")
    one_error(capsys, export(finished_run, out, "--overwrite"),
              r"holds files the previous export did not write \(model.q4.gguf\)")
    assert (out / "model.q4.gguf").read_bytes() == b"GGUF"
    (out / "model.q4.gguf").unlink()
    (out / "eval.json").write_text("{}")  # written by `sparsetune eval EXPORT`: sparsetune's own
    assert export(finished_run, out, "--overwrite") == 0
    assert not (out / "eval.json").exists() and (out / "sparsetune.json").is_file()


def test_export_on_a_full_disk_keeps_the_previous_export(finished_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    assert export(finished_run, out) == 0
    before = snapshot(out)
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def disk_full(self, folder, *args, **kwargs):  # what safetensors raises on a full disk (seen on a real tmpfs)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    one_error(capsys, export(finished_run, out, "--overwrite"),
              r"could not write the export .*: No space left on device; nothing was replaced")
    monkeypatch.undo()
    assert snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export")]  # the partial copy is gone


# ------------------------------------------------------------------------------------------ resume
def test_resume_with_every_checkpoint_damaged_deletes_nothing(model, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(model, run, *QUIET, "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=2") == 0
    ckpts = CheckpointStore(run).folders()
    assert [c.name for c in ckpts] == ["step-00000001", "step-00000002"]
    (ckpts[0] / "optimizer.pt").write_bytes(b"x")
    flip_bytes(ckpts[1] / "model" / "model.safetensors")
    before = snapshot(run)
    line = one_error(capsys, train_tiny(model, run, *QUIET, "train.max_steps=3", "--resume"),
                     r"--resume: no usable checkpoint in .*nothing was deleted")
    assert "step-00000001: optimizer.pt has 1 bytes" in line and "step-00000002: model/model.safetensors does not " \
                                                                 "match the sha256" in line
    assert snapshot(run) == before


def test_same_size_corruption_falls_back_to_the_previous_checkpoint(model, tmp_path, capsys):
    args = [*QUIET, "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=3"]
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    assert train_tiny(model, straight, *args) == 0
    assert train_tiny(model, damaged, *args) == 0
    flip_bytes(damaged / "checkpoints" / "step-00000003" / "optimizer.pt")
    capsys.readouterr()
    assert train_tiny(model, damaged, *args, "train.max_steps=3", "--resume") == 0
    out = capsys.readouterr().out
    assert re.search(r"skipping damaged checkpoint .*step-00000003: optimizer.pt does not match the sha256", out)
    assert "resuming from" in out and "step-00000002 at step 2" in out
    assert (damaged / "checkpoints" / "abandoned" / "step-00000003" / "optimizer.pt").is_file()  # kept, not deleted
    assert_bitwise(weights(CheckpointStore(straight).latest_complete()),
                   weights(CheckpointStore(damaged).latest_complete()))


def test_an_unreadable_file_its_marker_vouches_for_is_one_line(model, tmp_path, capsys):
    """Damage the marker cannot tell (the file was garbage when it was hashed): the restore names the checkpoint."""
    run = tmp_path / "run"
    assert train_tiny(model, run, *QUIET, "train.max_steps=1") == 0
    ckpt = CheckpointStore(run).latest_complete()
    (ckpt / "model" / "model.safetensors").write_bytes(b"\xff" * (ckpt / "model" / "model.safetensors").stat().st_size)
    marker = json.loads((ckpt / MARKER).read_text())
    (ckpt / MARKER).unlink()
    marker["files"], marker["sha256"] = _fsync_and_hash(ckpt)
    (ckpt / MARKER).write_text(json.dumps(marker))
    one_error(capsys, train_tiny(model, run, *QUIET, "train.max_steps=2", "--resume"),
              r"checkpoint .*step-00000001 could not be read \(.*\); nothing was changed")


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(model, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(model, run, *QUIET, "train.log_every=1", "train.max_steps=4", "train.save_every=1",
                      "train.keep_checkpoints=4") == 0
    abandoned = snapshot(run / "checkpoints" / "step-00000004")
    capsys.readouterr()
    older = run / "checkpoints" / "step-00000002"
    assert train_tiny(model, run, *QUIET, "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=4",
                      "--resume", str(older)) == 0
    out = capsys.readouterr().out
    assert re.search(r"resume from step 2: moved 2 newer checkpoint\(s\) aside, not deleted", out)
    aside = run / "checkpoints" / "abandoned"
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000003", "step-00000004"]
    assert snapshot(aside / "step-00000004") == abandoned
    assert CheckpointStore(run).latest_name() == "step-00000003"
    # a plain --resume follows `latest` (the new lineage), not the abandoned step 4
    assert train_tiny(model, run, *QUIET, "train.max_steps=3", "--resume") == 0
    assert "already complete at step 3" in capsys.readouterr().out
    assert train_steps(run) == [1, 2, 3]


def test_torn_last_lines_are_dropped_on_resume(model, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train.eval_every=1", "wandb.mode=disabled", "train.log_every=1", "train.save_every=1"]
    assert train_tiny(model, run, *base, "train.max_steps=2") == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # killed mid-append
    with open(run / "tradeoff.csv", "a") as f:
        f.write("3,1536,12.")
    capsys.readouterr()
    assert train_tiny(model, run, *base, "train.max_steps=3", "--resume") == 0
    out = capsys.readouterr().out
    assert re.search(r"dropped 1 torn line\(s\) from .*metrics.jsonl", out)
    assert re.search(r"dropped 1 torn line\(s\) from .*tradeoff.csv", out)
    assert train_steps(run) == [1, 2, 3]  # every line parses
    assert [ln.split(",")[0] for ln in (run / "tradeoff.csv").read_text().splitlines()[1:]] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("change, key", [
    ("data.eval_fraction=0.2", "data.eval_fraction"),
    ("data.eval_path=elsewhere.txt", "data.eval_path"),
    ("data.eval_split=test", "data.eval_split"),
    ("predictor.rank=8", "predictor.rank"),
    ("predictor.heads=true", "predictor.heads"),
    ("predictor.lookahead=true", "predictor.lookahead"),
])
def test_resume_refuses_keys_it_cannot_honour(finished_predictor_run, capsys, change, key):
    run, args = finished_predictor_run
    before = snapshot(run)
    line = one_error(capsys, train_tiny(run.parent / "model", run, *args, change, "--resume"),
                     r"cannot resume from .*: the recipe changed where the checkpoint cannot follow")
    assert key in line
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def finished_predictor_run(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    shutil.copytree(tiny_model_dirs["llama"], root / "model")
    args = [*QUIET, "train.max_steps=1", "predictor.enabled=true", "predictor.rank=4"]
    assert train_tiny(root / "model", root / "run", *args) == 0
    return root / "run", args


def test_resume_refuses_another_process_count_for_sharded_optimizer_state(finished_run):
    from sparsetune.checkpoint.resume import check_process_count
    from sparsetune.errors import SparsetuneError

    ckpt = CheckpointStore(finished_run).latest_complete()
    check_process_count(ckpt, 1, sharded_optimizer=True)  # written by 1 process: fine
    check_process_count(ckpt, 4, sharded_optimizer=False)  # a full optimizer state loads on any count
    with pytest.raises(SparsetuneError, match=r"sharded over 1 processes and this run has 2; relaunch with "
                                              r"--num-processes 1"):
        check_process_count(ckpt, 2, sharded_optimizer=True)


# ------------------------------------------------------------------------------------------ non-finite, disk full
def test_non_finite_steps_are_skipped_then_the_run_stops_with_the_last_good_checkpoint(model, tmp_path, capsys):
    run = tmp_path / "run"
    base = [*QUIET, "train.log_every=1", "regularizer.schedule=constant", "train.save_every=2"]
    assert train_tiny(model, run, *base, "train.max_steps=2") == 0
    good = snapshot(run / "checkpoints")
    capsys.readouterr()
    # coef * L1 overflows float32: every step's loss is inf
    code = train_tiny(model, run, *base, "train.max_steps=10", "regularizer.coef=1e39", "train.max_bad_steps=3",
                      "--resume")
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.search(r"train.max_bad_steps=3: steps 3-5 all had a non-finite loss or gradient "
                                          r"norm; stopped without saving \(the last good checkpoint .*step-00000002 "
                                          r"is intact\)", errors[0])
    assert "step 3: non-finite loss or gradient norm, update skipped (1 in a row" in captured.out
    assert snapshot(run / "checkpoints") == good  # no checkpoint written after a bad step
    logged = {m["step"]: m for m in train_logs(run)}
    assert [logged[s]["train/skipped_nonfinite"] for s in (3, 4)] == [1.0, 1.0]
    assert logged[4]["train/skipped_steps_total"] == 2.0
    # the last good checkpoint resumes with a sane coefficient and ends where a straight run ends
    straight = tmp_path / "straight"
    assert train_tiny(model, straight, *base, "train.max_steps=4") == 0
    assert train_tiny(model, run, *base, "train.max_steps=4", "--resume") == 0
    assert_bitwise(weights(CheckpointStore(straight).latest_complete()),
                   weights(CheckpointStore(run).latest_complete()))


@pytest.mark.parametrize("raised, said", [
    # what the OS raises from a write call, and what torch.save raised on a real full tmpfs (RuntimeError)
    (lambda f: OSError(errno.ENOSPC, "No space left on device", str(f)), r"No space left on device \(.*optimizer.pt\)"),
    (lambda f: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     r"a write stopped short \(torch: .*unexpected pos 576 vs 534\)"),
], ids=["OSError", "torch-RuntimeError"])
def test_disk_full_while_writing_a_checkpoint(model, tmp_path, capsys, monkeypatch, raised, said):
    args = [*QUIET, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=3"]
    straight, full = tmp_path / "straight", tmp_path / "full"
    assert train_tiny(model, straight, *args) == 0
    original = torch.save

    def save_on_a_full_disk(obj, f, *a, **kw):
        if ".tmp-step-00000004" in str(f):  # half the file reaches the disk, then ENOSPC
            original(obj, f, *a, **kw)
            Path(f).write_bytes(Path(f).read_bytes()[: Path(f).stat().st_size // 2])
            raise raised(f)
        return original(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    one_error(capsys, train_tiny(model, full, *args),
              rf"could not write checkpoint step 4 in .*: {said}; the previous checkpoint \(step-00000002\) and "
              r"checkpoints/latest are intact \(the unfinished copy was removed\); (free space|fix that) and continue "
              r"with: .*--resume")
    monkeypatch.undo()
    store = CheckpointStore(full)
    assert store.latest_name() == "step-00000002" and [f.name for f in store.folders()] == ["step-00000002"]
    assert not store.tmp_for(4).exists(), "the partial checkpoint is removed to give the space back"
    assert train_tiny(model, full, *args, "--resume") == 0
    assert_bitwise(weights(CheckpointStore(straight).latest_complete()), weights(store.latest_complete()))


# ------------------------------------------------------------------------------------------ trust, device
EVIL_MODEL = '''
import os
from pathlib import Path

from transformers import LlamaForCausalLM

Path(os.environ["SPARSETUNE_TEST_SENTINEL"]).write_text("remote code ran")


class EvilForCausalLM(LlamaForCausalLM):
    pass
'''


def test_trust_remote_code_comes_from_the_command_line_only(model, tmp_path):
    """A LoRA checkpoint whose recipe asks for trust_remote_code, over a base model that ships code: export and
    eval load it without running that code unless the user passes --trust-remote-code."""
    import os
    import subprocess
    import sys

    from tests.e2e_helpers import child_env

    base = tmp_path / "base_with_code"
    shutil.copytree(model, base)
    (base / "evil.py").write_text(EVIL_MODEL)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    sentinel = tmp_path / "sentinel"
    env = child_env(WANDB_MODE="disabled", SPARSETUNE_TEST_SENTINEL=str(sentinel),
                    HF_MODULES_CACHE=str(tmp_path / "hf_modules"))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sparsetune", *args], capture_output=True, text=True, env=env,
                              timeout=600)

    run = tmp_path / "run"
    train = cli("train", "quickstart", f"model.path={base}", f"output_dir={run}", "data.seq_len=64",
                "train.micro_batch_size=4", "train.max_steps=1", "train.eval_every=0", "train.eval_batches=1",
                "distill.weight=0", "peft.method=lora", "peft.lora.r=4", "model.trust_remote_code=true")
    assert train.returncode == 0, train.stderr[-2000:]
    assert sentinel.exists(), "the recipe the user ran asked for the model's code"
    sentinel.unlink()

    out = tmp_path / "export"
    proc = cli("export", str(run), "--out", str(out), "--no-eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sets model.trust_remote_code=true; ignored (pass --trust-remote-code" in proc.stdout
    assert not sentinel.exists(), "export ran code named by the checkpoint without --trust-remote-code"
    proc = cli("eval", str(run), "--batches", "1", "--json", str(tmp_path / "e.json"))
    assert proc.returncode == 0 and not sentinel.exists(), proc.stderr[-2000:]
    proc = cli("export", str(run), "--out", str(out), "--no-eval", "--overwrite", "--trust-remote-code")
    assert proc.returncode == 0 and sentinel.read_text() == "remote code ran", proc.stderr[-2000:]
    assert os.environ.get("SPARSETUNE_TEST_SENTINEL") is None


def test_device_option(finished_run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    out = tmp_path / "e.json"
    assert main(["eval", str(finished_run), "--batches", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["device"] == "cpu"  # auto = the CPU on a machine without a GPU
    capsys.readouterr()
    one_error(capsys, main(["eval", str(finished_run), "--device", "cuda"]),
              r"--device cuda: no CUDA device is available on this machine; use --device cpu")
    one_error(capsys, main(["export", str(finished_run), "--out", str(tmp_path / "x"), "--device", "tpu"]),
              r"--device 'tpu': expected auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "x").exists()
