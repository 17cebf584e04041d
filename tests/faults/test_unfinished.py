"""No export or eval of a half-made model: a checkpoint saved before its run's post-training steps (the thresholds
fit, the compensation fit, the predictors' calibration, the rest of an anneal) is refused by the names of what it
lacks, with the command that finishes the run; the finished run's export never depends on batch composition."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import torch

from sparsetune import load_sparse_model
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from tests.e2e_helpers import child_env, train_tiny
from tests.faults.helpers import finish, spawn_train

pytestmark = pytest.mark.e2e

OUTPUT_AWARE = ["relufy.activation=output_aware", "relufy.target_sparsity=0.5", "regularizer.type=none",
                "train.max_steps=4", "train.save_every=2"]


@pytest.fixture()
def model(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def test_a_run_killed_in_its_threshold_fit_is_refused_until_the_printed_command_finishes_it(model, tmp_path, capsys):
    run = tmp_path / "output aware"  # a space: the printed command must paste into a shell as it is
    code, _, err = finish(spawn_train(model, run, *OUTPUT_AWARE, SPARSETUNE_TEST_SIGNAL="fit:SIGKILL"))
    assert code == -9, err[-2000:]
    assert CheckpointStore(run).latest_complete().name == "step-00000002"  # the last periodic checkpoint

    for argv in (["export", str(run), "--out", str(tmp_path / "export"), "--no-eval"], ["eval", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ")
        assert "saved at step 2 of its run's 4" in err
        assert "lacks the `thresholds` conversion to fixed per-layer `output_aware` thresholds (fitted after the " \
               "last step)" in err
    assert not (tmp_path / "export").exists()

    command = err.split("finish the run with `")[1].split("`")[0]
    argv = shlex.split(command)
    assert argv[0] == "sparsetune"
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          env=child_env(WANDB_MODE="disabled"))
    assert done.returncode == 0, done.stderr[-2000:]

    assert main(["export", str(run), "--out", str(tmp_path / "export"), "--no-eval"]) == 0
    lm = load_sparse_model(tmp_path / "export").eval()
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, lm.config.vocab_size, (1, 24), generator=gen) for _ in range(2))
    with torch.no_grad():
        alone = lm(a).logits[0]
        beside = lm(torch.cat([a, b])).logits[0]
    # fixed thresholds: a sequence's logits do not move with its neighbours (a per-batch quantile would move them)
    assert torch.allclose(alone, beside, atol=1e-5, rtol=0)


def test_a_mid_anneal_checkpoint_is_refused_by_name_and_one_after_it_exports(model, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(model, run, "relufy.activation=relu", "anneal.fraction=0.5", "train.max_steps=4",
                      "train.save_every=1", "train.keep_checkpoints=5", "train.eval_every=0") == 0
    capsys.readouterr()
    step1, step3 = run / "checkpoints" / "step-00000001", run / "checkpoints" / "step-00000003"
    assert main(["export", str(step1), "--out", str(tmp_path / "e1"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "lacks the rest of the anneal (it ends at step 2; at step 1 the MLPs compute 50% of the way from SiLU " \
           "to the target" in err
    # past the anneal, a relu run's checkpoint computes what its export computes: nothing is missing
    assert main(["export", str(step3), "--out", str(tmp_path / "e3"), "--no-eval"]) == 0


def test_predictors_are_calibrated_after_the_final_zeros(model, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(model, run, *OUTPUT_AWARE, "predictor.enabled=true", "predictor.rank=4",
                      "train.eval_every=0") == 0
    out = capsys.readouterr().out
    fitted = out.index("thresholds: ")  # the conversion's notice
    calibrated = out.index("predictors: per-layer thresholds calibrated")
    assert fitted < calibrated, out
