"""`sparsetune train RECIPE --launch PRESET`: re-run the same command under `accelerate launch`.

Preemption: SIGTERM / SIGINT to this launcher are forwarded (once each) to the training workers, which agree on
a step, write a checkpoint and exit 0, so `accelerate launch` and this launcher exit 0 as well. The launch runs in
its own session so that a terminal's Ctrl-C reaches the workers once, through here, not twice. When a scheduler
signals every process at once, torch's launcher also forwards the signal to the workers; the workers treat
copies that arrive together as one request, and the launcher's grace period before it kills them
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT) is raised from torch's 30 s so a large checkpoint can finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sparsetune.console import notice
from sparsetune.launch.compatibility import check_launch
from sparsetune.launch.presets import get_preset
from sparsetune.launch.relay import ErrorRelay
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
    check_launch(recipe, preset.strategy, preset.shards_parameters, world, f"--launch {preset_name}")
    cmd, env = launch_command(preset_name, train_args, num_processes, **machine)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_S))
    where = "GPU" if _has_gpu() else "CPU (gloo)"
    notice(f"launching {world} process(es) with preset {preset_name} on {where}: {' '.join(cmd[2:])}")
    return run_forwarding_signals(cmd, env)


SHUTDOWN_GRACE_S = 900  # how long torch's launcher lets signalled workers checkpoint before it kills them


def training_workers(launcher_pid: int) -> list:
    """The `sparsetune train` worker processes under an `accelerate launch` process."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            argv = child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "sparsetune" in argv and "train" in argv:
            workers.append(child)
    return workers


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run the launch in its own session; forward SIGTERM / SIGINT to its training workers; relay its stderr
    without the launcher's traceback after a worker's one-line error (launch/relay.py); its exit code (2 after a
    worker's one-line error)."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    relay = ErrorRelay(os.dup(proc.stderr.fileno()), sys.stderr).start()  # the workers' stderr, as it comes
    proc.stderr.close()

    def forward(signum, frame) -> None:
        name = signal.Signals(signum).name
        workers = training_workers(proc.pid)
        targets = workers or [psutil.Process(proc.pid)]  # still starting: let the launcher shut down its group
        for target in targets:
            try:
                # the signal itself: a second Ctrl-C must reach the workers as SIGINT to abort them at once
                target.send_signal(signum if workers else signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        notice(f"{name} received by the launcher; forwarded to {len(workers)} worker(s) (they checkpoint at the end "
               "of the current step and exit)", err=True)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # a handler raced with wait(): keep waiting for the workers' checkpoint
                time.sleep(0.1)
        relay.join(timeout=30)
        # a worker's one-line error (exit 2) is the launch's, not torch's launcher's exit 1 and traceback
        return 2 if code != 0 and relay.errors else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
