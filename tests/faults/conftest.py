"""Fixtures shared by the fault tests."""

import pytest

from tests.e2e_helpers import train_tiny


@pytest.fixture(scope="session")
def finished_run(tiny_model_dirs, tmp_path_factory):
    """A finished tiny run with two checkpoints (steps 1 and 2), exported or resumed by the tests. Trained once per
    session and shared by every fault module that uses it: read it, export it, evaluate it with --json elsewhere;
    a test that must change it works on a copy (shutil.copytree)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, "train.eval_every=0", "wandb.mode=disabled", "train.max_steps=2",
                      "train.save_every=1", "train.keep_checkpoints=2") == 0
    return run
