"""Faults reproduced with their real mechanism: real signals at every phase of a run and an export (delivered by
the process to itself with os.kill at that phase, or SIGKILL in a child process), real concurrent processes for
the run and export locks, a real small filesystem (tmpfs, as root) for a full and a read-only disk.

Each test asserts the one `error:` line (or the notice), the exit code, that every file sparsetune did not make is
still there, and bitwise resume where it applies. docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from tests.e2e_helpers import one_error, read_metrics, tmpfs, train_steps, train_tiny
from tests.faults.helpers import (
    QUIET,
    assert_bitwise,
    export,
    finish,
    killed_on_exit,
    snapshot,
    spawn,
    spawn_train,
    wait_for,
    weights,
)
from tests.hooks.fault_points import install

pytestmark = pytest.mark.e2e

IS_ROOT = os.geteuid() == 0


@pytest.fixture()
def model(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def same_weights(a: Path, b: Path) -> None:
    """The newest checkpoints of two runs hold bitwise equal weights."""
    assert_bitwise(weights(CheckpointStore(a).latest_complete()), weights(CheckpointStore(b).latest_complete()))


# ------------------------------------------------------------------------------------- setup, lock, first steps
def test_ctrl_c_during_setup_deletes_nothing_it_did_not_write(model, tmp_path, capsys, monkeypatch):
    """A real SIGINT while the data is tokenized, after someone wrote a file into the new output_dir."""
    from sparsetune.training import trainer

    out = tmp_path / "X"
    pack = trainer.pack

    def someone_writes_then_ctrl_c(*args, **kwargs):
        if not (out / "notes.txt").exists():
            (out / "notes.txt").write_text("written by another job meanwhile")
            os.kill(os.getpid(), 2)  # SIGINT, as Ctrl-C delivers it
            time.sleep(0.2)
        return pack(*args, **kwargs)

    monkeypatch.setattr(trainer, "pack", someone_writes_then_ctrl_c)
    assert train_tiny(model, out, *QUIET, "train.max_steps=1") == 0
    assert "stopped during setup (SIGINT); nothing was written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # theirs kept; our lock file removed
    assert (out / "notes.txt").read_text() == "written by another job meanwhile"
    # a failed setup removes the folder it made when nothing else is in it
    fresh = tmp_path / "fresh"
    one_error(capsys, train_tiny(model, fresh, *QUIET, f"data.path={tmp_path / 'missing.txt'}"), r"data.path")
    assert not fresh.exists()


def test_one_writer_per_run_folder_and_sigterm_in_the_initial_eval(model, tmp_path, capsys):
    """A second train or a --resume beside a running train is refused naming the holder; SIGTERM during the
    initial evaluation stops cleanly, and --resume then runs the same run from step 0, bitwise."""
    run, sentinel = tmp_path / "run", tmp_path / "in_eval"
    args = ["train.max_steps=3", "train.save_every=3"]
    child = spawn_train(model, run, *args, SPARSETUNE_TEST_PAUSE="eval", SPARSETUNE_TEST_SENTINEL=str(sentinel),
                        SPARSETUNE_TEST_PAUSE_S="120")
    with killed_on_exit(child):
        wait_for(sentinel, child)
        before = snapshot(run)
        holder = rf"in use by another sparsetune process \(pid {child.pid} on {re.escape(socket.gethostname())}, " \
                 r"started .*\); wait for it to finish or stop it"
        one_error(capsys, train_tiny(model, run, *QUIET, *args), holder)
        one_error(capsys, train_tiny(model, run, *QUIET, *args, "--resume"), holder)
        one_error(capsys, train_tiny(model, run, *QUIET, *args, "--overwrite"), holder)
        assert snapshot(run) == before  # the running job's files untouched
        child.send_signal(15)  # a real SIGTERM while the child is in its initial evaluation
        time.sleep(0.5)
        sentinel.unlink()
        code, out, err = finish(child)
    assert code == 0, err[-3000:]
    assert "stopped before step 1 (SIGTERM): nothing to checkpoint yet; resume with:" in out
    capsys.readouterr()
    assert train_tiny(model, run, *QUIET, *args, "--resume") == 0
    assert "holds a run stopped before its first checkpoint; starting it again from step 0" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert train_tiny(model, straight, *QUIET, *args) == 0
    same_weights(straight, run)
    assert train_steps(run) == train_steps(straight)  # each step logged once


def test_kill_9_before_the_first_checkpoint_resumes_from_the_start(model, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train.max_steps=3", "train.save_every=3", "train.log_every=1"]
    code, _, err = finish(spawn_train(model, run, *args, SPARSETUNE_TEST_SIGNAL="step:SIGKILL:2"))
    assert code == -9, err[-2000:]
    assert (run / "sparsetune-run.json").is_file() and not CheckpointStore(run).folders()
    one_error(capsys, main(["eval", str(run), "--batches", "1"]), r"is a sparsetune run with no checkpoint yet")
    assert train_tiny(model, run, *QUIET, *args, "--resume") == 0  # the dead holder's lock is free
    straight = tmp_path / "straight"
    assert train_tiny(model, straight, *QUIET, *args) == 0
    same_weights(straight, run)
    assert train_steps(run) == [1, 2, 3]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_real_signal_in_a_step_and_in_a_checkpoint_resumes_bitwise(model, tmp_path, monkeypatch, capsys, sig):
    args = [*QUIET, "train.max_steps=4", "train.save_every=2", "train.log_every=1"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert train_tiny(model, straight, *args) == 0
    with monkeypatch.context() as m:
        install("step", sig, step=1, patch=m.setattr)
        assert train_tiny(model, run, *args) == 0
    assert f"stopped at step 1 ({sig})" in capsys.readouterr().out
    with monkeypatch.context() as m:
        install("checkpoint", sig, step=2, patch=m.setattr)  # arrives while checkpoint 2 is being written
        assert train_tiny(model, run, *args, "--resume") == 0
    assert f"stopped at step 2 ({sig})" in capsys.readouterr().out
    assert train_tiny(model, run, *args, "--resume") == 0
    same_weights(straight, run)
    assert train_steps(run) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ resume truth
def _recording_lrs(monkeypatch) -> list[dict]:
    """The hyper-parameters AdamW actually used, per optimizer step (read inside AdamW.step itself)."""
    used: list[dict] = []
    original = torch.optim.AdamW.step

    def step(self, *a, **kw):
        used.append({"lr": self.param_groups[0]["lr"], "betas": tuple(self.param_groups[0]["betas"]),
                     "weight_decay": [g["weight_decay"] for g in self.param_groups]})
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return used


def _cosine(step: int, total: int) -> float:
    """transformers' cosine schedule without warmup, written out: 0.5 * (1 + cos(pi * step / total))."""
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * step / total)))


def test_resume_applies_new_lr_weight_decay_and_betas_and_extends_without_an_lr_0_step(model, tmp_path, capsys,
                                                                                       monkeypatch):
    args = [*QUIET, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=2", "train.lr=3e-3",
            "train.lr_warmup_steps=0"]
    run = tmp_path / "run"
    used = _recording_lrs(monkeypatch)
    assert train_tiny(model, run, *args) == 0
    assert [u["lr"] for u in used] == pytest.approx([3e-3 * _cosine(s, 4) for s in range(4)], rel=1e-12)
    unchanged = weights(CheckpointStore(run).latest_complete())
    used.clear()
    capsys.readouterr()
    assert train_tiny(model, run, *args, "train.lr=1e-2", "train.weight_decay=0.1", "train.adam_beta1=0.8",
                      "--resume", str(run / "checkpoints" / "step-00000002")) == 0
    out = capsys.readouterr().out
    assert "using the new value of train.lr: 0.003 -> 0.01 (set on the restored optimizer and LR schedule)" in out
    assert [u["lr"] for u in used] == pytest.approx([1e-2 * _cosine(s, 4) for s in (2, 3)], rel=1e-12)
    assert all(u["betas"] == (0.8, 0.999) for u in used)
    assert all(u["weight_decay"][0] == 0.1 and set(u["weight_decay"][1:]) <= {0.0} for u in used)
    changed = weights(CheckpointStore(run).latest_complete())
    assert any(not torch.equal(changed[k], unchanged[k]) for k in changed)  # the new values took effect
    history = [json.loads(line) for line in (run / "recipe-history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and any(c.startswith("train.lr: 0.003 -> 0.01") for c in history[-1]["changes"])
    # extending a finished run: its first new step uses the re-stretched schedule, not the finished run's LR 0
    done = tmp_path / "done"
    no_warmup = [*QUIET, "train.lr=3e-3", "train.lr_warmup_steps=0"]
    assert train_tiny(model, done, *no_warmup, "train.max_steps=2") == 0
    used.clear()
    assert train_tiny(model, done, *no_warmup, "train.max_steps=4", "--resume") == 0
    assert [u["lr"] for u in used] == pytest.approx([3e-3 * _cosine(s, 4) for s in (2, 3)], rel=1e-12)
    assert min(u["lr"] for u in used) > 0


def test_a_moved_run_folder_resumes_in_its_new_place(model, tmp_path, capsys):
    args = [*QUIET, "train.save_every=1", "train.keep_checkpoints=1"]
    run, moved, straight = tmp_path / "run", tmp_path / "elsewhere" / "run", tmp_path / "straight"
    assert train_tiny(model, run, *args, "train.max_steps=2") == 0
    moved.parent.mkdir()
    shutil.move(run, moved)
    capsys.readouterr()
    assert train_tiny(model, moved, *args, "train.max_steps=3", "--resume") == 0
    assert re.search(r"resume: the run folder moved \('.*/run' -> '.*/elsewhere/run'\); continuing in the new place",
                     capsys.readouterr().out)
    assert train_tiny(model, straight, *args, "train.max_steps=3") == 0
    same_weights(straight, moved)


# ------------------------------------------------------------------------------------------ exports
def test_two_exports_into_one_folder_one_is_refused(finished_run, tmp_path, capsys):
    out, sentinel = tmp_path / "export", tmp_path / "exporting"
    child = spawn("export", str(finished_run), "--out", str(out), "--no-eval", SPARSETUNE_TEST_PAUSE="export",
                  SPARSETUNE_TEST_SENTINEL=str(sentinel), SPARSETUNE_TEST_PAUSE_S="120")
    with killed_on_exit(child):
        wait_for(sentinel, child)
        one_error(capsys, export(finished_run, out), rf"export folder .*export is in use by another sparsetune "
                                                     rf"process \(pid {child.pid} on .*sparsetune export")
        sentinel.unlink()
        code, _, err = finish(child)
    assert code == 0, err[-2000:]
    assert json.loads((out / "sparsetune.json").read_text())["step"] == 2
    assert not list(tmp_path.glob(".export.*"))  # no lock file or copy left beside it


def test_killed_exports_leave_debris_that_the_next_export_cleans(finished_run, tmp_path, capsys):
    out = tmp_path / "export"
    code, _, err = finish(spawn("export", str(finished_run), "--out", str(out), "--no-eval",
                                SPARSETUNE_TEST_SIGNAL="export-write:SIGKILL"))
    assert code == -9, err[-2000:]
    assert not out.exists() and len(list(tmp_path.glob(".export.tmp*"))) == 1
    assert export(finished_run, out) == 0
    assert re.search(r"removed 1 unfinished copy\(ies\) left by a stopped export: \.export\.tmp\d+",
                     capsys.readouterr().out)
    before = snapshot(out)
    # killed between the two renames that replace it: the previous export sits in a hidden folder
    code, _, err = finish(spawn("export", str(finished_run / "checkpoints" / "step-00000001"), "--out", str(out),
                                "--no-eval", "--overwrite", SPARSETUNE_TEST_SIGNAL="export-swap:SIGKILL"))
    assert code == -9, err[-2000:]
    assert not out.exists() and len(list(tmp_path.glob(".export.old*"))) == 1
    assert export(finished_run / "checkpoints" / "step-00000001", out, "--overwrite") == 0
    printed = capsys.readouterr().out
    assert "restored the previous export" in printed
    assert json.loads((out / "sparsetune.json").read_text())["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]
    assert before != snapshot(out)


def test_export_out_symlink_is_judged_by_its_target(finished_run, tmp_path, capsys, monkeypatch):
    target, link = tmp_path / "real_export", tmp_path / "link"
    assert export(finished_run / "checkpoints" / "step-00000001", target) == 0
    link.symlink_to(target)
    capsys.readouterr()
    assert export(finished_run, link, "--overwrite") == 0
    assert f"--out {link} is a symlink; using its target {target}" in capsys.readouterr().out
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads((target / "sparsetune.json").read_text())["step"] == 2  # the target was replaced
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    monkeypatch.chdir(tmp_path / "busy")
    one_error(capsys, export(finished_run, "."), r"export folder .*busy exists and is not empty")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "x"


def test_dangling_symlink_output_dir_trains_into_its_target(model, tmp_path, capsys):
    link, target = tmp_path / "link", tmp_path / "scratch" / "run"
    link.symlink_to(target)
    assert train_tiny(model, link, *QUIET, "train.max_steps=1") == 0
    assert link.is_symlink() and (target / "sparsetune-run.json").is_file()
    assert "is a symlink; using its target" in capsys.readouterr().out


def test_a_lora_checkpoint_refuses_a_changed_base(finished_run, tmp_path, capsys):
    base = tmp_path / "base"
    assert export(finished_run, base) == 0
    lora = tmp_path / "lora"
    assert train_tiny(base, lora, *QUIET, "train.max_steps=1", "peft.method=lora", "peft.lora.r=4") == 0
    assert (CheckpointStore(lora).latest_complete() / "base_model.json").is_file()
    assert export(lora, tmp_path / "lora_export") == 0
    # the base is replaced by another export (another checkpoint of the same run)
    assert export(finished_run / "checkpoints" / "step-00000001", base, "--overwrite") == 0
    pattern = r"the LoRA checkpoint .* was trained on the base model .*base, which changed since \(.*sha256 differs"
    one_error(capsys, export(lora, tmp_path / "again"), pattern)
    one_error(capsys, main(["eval", str(lora), "--batches", "1"]), pattern)
    one_error(capsys, train_tiny(base, lora, *QUIET, "train.max_steps=2", "peft.method=lora", "peft.lora.r=4",
                                 "--resume"), pattern)
    assert not (tmp_path / "again").exists()


# ------------------------------------------------------------------------------------------ eval / analyze outputs
def test_eval_writes_only_where_sparsetune_may(model, finished_run, tmp_path, capsys):
    mine = tmp_path / "my_model"
    shutil.copytree(model, mine)
    before = snapshot(mine)
    assert main(["eval", str(mine), "--batches", "1", "--batch-size", "1"]) == 0
    assert "is not a run or export sparsetune made, so nothing is written into it" in capsys.readouterr().out
    assert snapshot(mine) == before
    data = tmp_path / "held.txt"
    data.write_text("\n\n".join(["The quick brown fox jumps over the lazy dog. " * 40] * 4))
    result = tmp_path / "out.json"
    assert main(["eval", str(mine), "--batches", "1", "--batch-size", "1", "--data", str(data),
                 "--json", str(result)]) == 0
    assert json.loads(result.read_text())["data"] == str(data)
    one_error(capsys, main(["eval", str(mine), "--json", str(tmp_path)]), r"--json .* is a folder; name a file")
    (tmp_path / "afile").write_text("x")
    one_error(capsys, main(["analyze", str(mine), "--out", str(tmp_path / "afile")]),
              r"--out .*afile exists and is not a folder")
    one_error(capsys, main(["analyze", str(mine)]), r"pass --out DIR")


@pytest.mark.parametrize("argv, pattern", [
    (["eval", "RUN", "--batches", "0"], r"argument --batches: must be at least 1, got 0"),
    (["eval", "RUN", "--batch-size", "0"], r"argument --batch-size: must be at least 1, got 0"),
    (["eval", "RUN", "--seq-len", "0"], r"argument --seq-len: must be at least 2, got 0"),
    (["export", "RUN", "--out", "OUT", "--eval-batches", "-1"], r"argument --eval-batches: must be at least 1"),
    (["analyze", "RUN", "--batches", "0"], r"argument --batches: must be at least 1"),
])
def test_no_figure_from_nothing(finished_run, tmp_path, capsys, argv, pattern):
    argv = [str(finished_run) if a == "RUN" else str(tmp_path / "x") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    one_error(capsys, exc.value.code, pattern)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, pattern", [("bad\x00name", r"contains a NUL byte"),
                                           ("a" * 256, r"the name a+\.\.\. has 256 bytes; at most 255")])
def test_output_names_the_os_cannot_hold(model, finished_run, tmp_path, capsys, name, pattern):
    one_error(capsys, train_tiny(model, tmp_path / name, *QUIET), r"output_dir.*(NUL byte|256 bytes)")
    one_error(capsys, export(finished_run, tmp_path / name), rf"--out.*{pattern}")
    one_error(capsys, main(["eval", str(finished_run), "--json", str(tmp_path / name)]), rf"--json.*{pattern}")
    one_error(capsys, main(["eval", str(tmp_path / name)]), rf"MODEL.*{pattern}")
    one_error(capsys, main(["export", str(tmp_path / name), "--out", str(tmp_path / "x")]), rf"RUN.*{pattern}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_api_refuses_zero_eval_batches(finished_run, tmp_path):
    from sparsetune.errors import SparsetuneError
    from sparsetune.export.exporter import export as export_api

    with pytest.raises(SparsetuneError, match="--eval-batches must be a positive number"):
        export_api(finished_run, tmp_path / "x", eval_batches_n=0)


# ------------------------------------------------------------------------------------------ debris after kills
def test_kill_during_pruning_leaves_no_half_deleted_checkpoint(model, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=1"]
    code, _, err = finish(spawn_train(model, run, *args, SPARSETUNE_TEST_SIGNAL="prune:SIGKILL"))
    assert code == -9, err[-2000:]
    store = CheckpointStore(run)
    assert [f.name for f in store.folders()] == ["step-00000002"]
    assert (run / "checkpoints" / ".del-step-00000001").is_dir()
    assert store.latest_complete().name == "step-00000002"
    assert train_tiny(model, run, *QUIET, *args, "--resume") == 0
    assert re.search(r"removed 1 unfinished folder\(s\) a stopped run left in .*: \.del-step-00000001",
                     capsys.readouterr().out)
    assert not list((run / "checkpoints").glob(".*step*")) and store.latest_name() == "step-00000003"


def test_kill_during_overwrite_leaves_a_folder_overwrite_can_clear(model, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "my_notes.txt").write_text("mine")
    code, _, err = finish(spawn_train(model, run, "train.max_steps=1", "--overwrite",
                                      SPARSETUNE_TEST_SIGNAL="clear:SIGKILL"))
    assert code == -9, err[-2000:]
    assert (run / "sparsetune-run.json").is_file()  # the marker goes last
    assert train_tiny(model, run, *QUIET, "train.max_steps=1", "--overwrite") == 0
    assert (run / "my_notes.txt").read_text() == "mine" and train_steps(run) == [1]


def test_step_folders_past_10_to_the_8_and_a_checkpoint_left_while_replaced(tmp_path):
    store = CheckpointStore(tmp_path / "run")
    for step in (99_999_999, 100_000_000, 100_000_001):
        (store.begin(step) / "weights.bin").write_bytes(b"w" * (step % 7 + 1))
        store.commit(step, keep=5)
    assert [f.name for f in store.folders()] == ["step-99999999", "step-100000000", "step-100000001"]
    assert store.latest_complete().name == "step-100000001" and len(store.lineage()) == 3
    # killed between the two renames of commit() re-saving a step: the old copy is put back
    final = store.root / "step-100000001"
    os.replace(final, store.root / ".old-step-100000001")
    notices: list[str] = []
    store.clean_debris(notices.append)
    assert final.is_dir() and store.latest_complete() == final
    assert notices and "put back checkpoint(s) step-100000001" in notices[0]


# ------------------------------------------------------------------------------------------ a real full disk
def fill(disk: Path) -> Path:
    """Fill the filesystem for real: write until the OS says ENOSPC."""
    filler = disk / f"filler{len(list(disk.glob('filler*')))}"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    return filler


needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a real tmpfs needs root")


@needs_root
def test_real_full_disk_while_checkpointing_then_resume(model, tmp_path, capsys, monkeypatch):
    args = [*QUIET, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=3"]
    straight = tmp_path / "straight"
    assert train_tiny(model, straight, *args) == 0
    with tmpfs(tmp_path / "disk", "24m") as disk:
        run = disk / "run"
        begin = CheckpointStore.begin
        fillers: list[Path] = []

        def fill_before_step_4(self, step):
            tmp = begin(self, step)
            if step == 4:
                fillers.append(fill(disk))
            return tmp

        with monkeypatch.context() as m:
            m.setattr(CheckpointStore, "begin", fill_before_step_4)
            line = one_error(capsys, train_tiny(model, run, *args),
                             r"could not write checkpoint step 4 in .*: No space left on device.*; the previous "
                             r"checkpoint \(step-00000002\) and checkpoints/latest are intact \(the unfinished copy "
                             r"was removed\); free space and continue with: .*--resume")
        assert "Traceback" not in line
        store = CheckpointStore(run)
        assert [f.name for f in store.folders()] == ["step-00000002"] and not store.tmp_for(4).exists()
        fillers.append(fill(disk))  # still full: the resume says so in one line
        one_error(capsys, train_tiny(model, run, *args, "--resume"),
                  r"(cannot write into output_dir|could not write).*No space left on device")
        for f in fillers:
            f.unlink()
        assert train_tiny(model, run, *args, "--resume") == 0
        same_weights(straight, run)
        assert [m["step"] for m in read_metrics(run) if "train/loss" in m] == train_steps(straight)


@needs_root
def test_real_full_disk_during_export_keeps_the_previous_export(finished_run, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "export"
        assert export(finished_run, out) == 0
        before = snapshot(out)
        filler = fill(disk)
        one_error(capsys, export(finished_run, out, "--overwrite"),
                  r"could not write the export .*: No space left on device.*; nothing was replaced")
        assert snapshot(out) == before
        assert not [p for p in disk.iterdir() if p.name.startswith(".export")]
        filler.unlink()


@needs_root
def test_read_only_filesystem_is_one_line_before_any_computation(model, finished_run, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        one_error(capsys, train_tiny(model, ro / "run", *QUIET), r"cannot create output_dir .*: Read-only file system")
        start = time.monotonic()
        one_error(capsys, main(["eval", str(finished_run), "--json", str(ro / "e.json")]),
                  r"--json .*e.json: .* is on a read-only filesystem")
        one_error(capsys, main(["analyze", str(finished_run), "--out", str(ro / "a")]),
                  r"--out .*a: .* is on a read-only filesystem")
        one_error(capsys, export(finished_run, ro / "x"), r"(cannot write|could not write) the export .*Read-only")
        assert time.monotonic() - start < 60
