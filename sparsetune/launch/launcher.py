"""`sparsetune train RECIPE --launch PRESET`: re-run the same command under `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys

from sparsetune.launch.compatibility import check_launch
from sparsetune.launch.presets import get_preset
from sparsetune.recipe.schema import Recipe


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_command(preset_name: str, train_args: list[str], num_processes: int, num_machines: int = 1,
                   machine_rank: int = 0, main_process_ip: str | None = None,
                   main_process_port: int | None = None) -> tuple[list[str], dict]:
    """(argv, environment) of the accelerate launch that runs `sparsetune train *train_args` on every process."""
    preset = get_preset(preset_name)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset.config_file),
           "--num_processes", str(num_processes * num_machines), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank)]
    if preset.deepspeed_file is not None:
        cmd += ["--deepspeed_config_file", str(preset.deepspeed_file)]
    if main_process_ip:
        cmd += ["--main_process_ip", main_process_ip]
    if main_process_port:
        cmd += ["--main_process_port", str(main_process_port)]
    env = dict(os.environ)
    if not _has_gpu() and preset.strategy != "deepspeed":
        # True multi-process CPU over gloo (DeepSpeed brings its own CPU accelerator and must not see this).
        env["ACCELERATE_USE_CPU"] = "1"
    cmd += ["-m", "sparsetune", "train", *train_args]
    return cmd, env


def launch(recipe: Recipe, preset_name: str, train_args: list[str], num_processes: int | None, **machine) -> int:
    preset = get_preset(preset_name)
    if num_processes is None:
        import torch

        num_processes = torch.cuda.device_count() or 2
    world = num_processes * machine.get("num_machines", 1)
    check_launch(recipe, preset.strategy, preset.shards_parameters, world, preset_name)
    cmd, env = launch_command(preset_name, train_args, num_processes, **machine)
    where = "GPU" if _has_gpu() else "CPU (gloo)"
    print(f"sparsetune: launching {world} process(es) with preset {preset_name} on {where}: "
          f"{' '.join(cmd[2:])}", flush=True)
    return subprocess.call(cmd, env=env)
