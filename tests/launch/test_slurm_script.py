"""scripts/slurm_multinode.sh hands the overrides to `sparsetune train` unsplit, under stub SLURM commands.

Only srun, scontrol and sparsetune are stubs; the script itself, and the quoting under test, run in real bash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_multinode.sh"
HOSTS = ["node-a17", "node-b03"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the script needs bash")

# srun: drop its own options, run the task command as given (one task, standing for one node). Like the real
# srun it gives the task its own SLURM_NODEID, which differs from the batch shell's (that runs on node 0).
SRUN = """#!/bin/bash
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
export SLURM_NODEID=$TASK_NODEID
exec "$@"
"""
# scontrol: only `show hostnames NODELIST`, one host a line.
SCONTROL = f"""#!/bin/bash
[[ $1 == show && $2 == hostnames ]] || exit 2
printf '%s\\n' {" ".join(HOSTS)}
"""
# sparsetune: record argv (without the program name) as JSON.
SPARSETUNE = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["ARGV_FILE"], "w") as f:
    json.dump(sys.argv[1:], f)
"""


def _stub_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL, "sparsetune": SPARSETUNE}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(tmp_path: Path, args: list[str], task_nodeid: int = 1, **env: str) -> list[str]:
    """Run the script as sbatch would (`bash SCRIPT ARGS...`); the argv sparsetune got in the task on node
    `task_nodeid`."""
    argv_file = tmp_path / "argv.json"
    full_env = {
        **os.environ,
        "PATH": f"{_stub_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}",
        "ARGV_FILE": str(argv_file),
        "SLURM_JOB_NODELIST": ",".join(HOSTS),
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",  # the batch shell's
        "TASK_NODEID": str(task_nodeid),
        "SLURM_GPUS_ON_NODE": "2",
    }
    full_env.pop("MAIN_PORT", None)  # the caller's own setting would change the expected port
    full_env.update(env)
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, text=True, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(argv_file.read_text())


def test_overrides_with_spaces_and_quotes_arrive_as_single_arguments(tmp_path: Path) -> None:
    recipe = "recipes/quickstart.yaml"
    # Spaces, both quote kinds, and what a shell would expand or glob: each must arrive verbatim, as one argument.
    overrides = ["description=my run with spaces", "wandb.name=it's quoted", 'data.note="a b" $HOME `x` *']
    argv = _run(tmp_path, [recipe, "ddp", *overrides])
    assert argv == [
        "train", recipe, *overrides, "--resume",
        "--launch", "ddp", "--num-processes", "2",
        "--num-machines", "2", "--machine-rank", "1",
        "--main-process-ip", HOSTS[0], "--main-process-port", "29500",
    ]


@pytest.mark.parametrize("task_nodeid", [0, 1])
def test_machine_rank_is_read_in_each_task(tmp_path: Path, task_nodeid: int) -> None:
    # The batch shell says node 0; the rank must be the task's own SLURM_NODEID, not the batch shell's.
    argv = _run(tmp_path, ["recipes/quickstart.yaml", "fsdp"], task_nodeid=task_nodeid)
    assert argv[argv.index("--machine-rank") + 1] == str(task_nodeid)


def test_defaults_without_preset_or_overrides(tmp_path: Path) -> None:
    # No preset: zero3; no overrides: the recipe is not passed twice; MAIN_PORT picks the port.
    argv = _run(tmp_path, ["my recipe.yaml"], MAIN_PORT="31000")
    assert argv[:3] == ["train", "my recipe.yaml", "--resume"]
    assert argv[argv.index("--launch") + 1] == "zero3"
    assert argv[argv.index("--main-process-port") + 1] == "31000"
