"""A launch whose workers fail on bad input ends in their one line (exit 2), without torch's launcher's traceback;
the relay passes everything as it comes until then, progress bars included."""

import io
import os

from sparsetune.launch.relay import ErrorRelay
from tests.distributed.launching import COMMON, free_port, sparsetune


def relayed(*pieces: str) -> tuple[str, list[str]]:
    read, write = os.pipe()
    out = io.StringIO()
    relay = ErrorRelay(read, out).start()
    for piece in pieces:
        os.write(write, piece.encode())
    os.close(write)
    relay.join(timeout=10)
    return out.getvalue(), relay.errors


def test_everything_passes_until_an_error_then_only_errors_once_and_notices():
    progress = "train:  10%|#  | 1/10\rtrain:  20%|## | 2/10"
    out, errors = relayed(progress, "\nsparsetune: saved\nerr", "or: bad key\nTraceback (most recent call last):\n",
                          '  File "launch.py"\nerror: bad key\nsparsetune: rank 1 gave up\nerror: other\ntail')
    assert out == f"{progress}\nsparsetune: saved\nerror: bad key\nsparsetune: rank 1 gave up\nerror: other\n"
    assert errors == ["error: bad key", "error: other"]
    # a worker that fails without an error line (a bug) keeps its traceback
    crash = "Traceback (most recent call last):\n  File x\nZeroDivisionError: division by zero\n"
    assert relayed(crash) == (crash, [])


def test_a_worker_error_under_launch_is_one_line_and_exit_2(tiny_model_dirs, tmp_path):
    # the predictor budget is checked by the workers, after the launch: each rank says it in one line
    proc = sparsetune("train", "quickstart", f"model.path={tiny_model_dirs['llama']}", f"output_dir={tmp_path / 'r'}",
                      *COMMON, "predictor.enabled=true", "predictor.rank=64", "--launch", "ddp", "--num-processes",
                      "2", "--main-process-port", str(free_port()))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "predictor.max_param_fraction" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
