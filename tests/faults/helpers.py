"""What the fault tests share: snapshots of folders ("nothing was lost"), checkpoint weights compared bitwise, the
export command, and `sparsetune train` in a child process with the fault points of tests/hooks loaded."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsetune.checkpoint.resume import read_weights
from sparsetune.cli import main
from tests.e2e_helpers import TINY_TRAIN, child_env

QUIET = ["train.eval_every=0", "wandb.mode=disabled"]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (what "nothing was lost" is checked against)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return read_weights(ckpt / "model")


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def export(run: Path, out: Path | str, *extra: str) -> int:
    return main(["export", str(run), "--out", str(out), "--no-eval", *extra])


def spawn(*args: str, **env: str) -> subprocess.Popen:
    """`sparsetune ARGS` in a child process with tests/hooks loaded (fault points from SPARSETUNE_TEST_*)."""
    return subprocess.Popen([sys.executable, "-m", "sparsetune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(hooks=True, WANDB_MODE="disabled", **env))


def spawn_train(model: Path, out: Path, *overrides: str, **env: str) -> subprocess.Popen:
    return spawn("train", "quickstart", f"model.path={model}", f"output_dir={out}", *TINY_TRAIN, *QUIET,
                 *overrides, **env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended ({proc.returncode}) first: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < end, "the child never reached the fault point"
        time.sleep(0.05)


@contextlib.contextmanager
def killed_on_exit(proc: subprocess.Popen):
    """The child is killed if the test leaves before it ended (a failed assertion while it is paused)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err
