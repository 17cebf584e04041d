"""The shipped launch presets, the launch command they produce, and the recipe x preset checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sparsetune.errors import SparsetuneError
from sparsetune.launch.compatibility import check_launch
from sparsetune.launch.launcher import launch_command
from sparsetune.launch.presets import PRESETS, get_preset
from sparsetune.recipe.loading import load_recipe

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_TYPES = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_files_are_valid_and_match_their_engine(name):
    preset = get_preset(name)
    cfg = yaml.safe_load(preset.config_file.read_text())
    assert cfg["distributed_type"] == ACCELERATE_TYPES[preset.strategy]
    if preset.strategy == "deepspeed":
        ds = json.loads(preset.deepspeed_file.read_text())
        assert ds["zero_optimization"]["stage"] == preset.zero_stage
        assert "mixed_precision" not in cfg  # accelerate refuses it next to a DeepSpeed config file
        if preset.zero_stage == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert ("offload_param" in ds["zero_optimization"]) is preset.offload


def test_top_level_accelerate_config_is_ddp():
    cfg = yaml.safe_load((ROOT / "accelerate_config.yaml").read_text())
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["use_cpu"] is False


def test_launch_command_runs_sparsetune_under_accelerate_with_the_preset():
    cmd, env = launch_command("zero3", ["quickstart", "train.max_steps=3", "--resume"], 4, num_machines=2,
                              machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29555)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(get_preset("zero3").config_file)
    assert Path(cmd[cmd.index("--deepspeed_config_file") + 1]).is_file()
    assert cmd[cmd.index("--num_processes") + 1] == "8"  # 4 per machine x 2 machines
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.1"
    assert cmd[-6:] == ["-m", "sparsetune", "train", "quickstart", "train.max_steps=3", "--resume"]
    assert env.get("ACCELERATE_USE_CPU") == os.environ.get("ACCELERATE_USE_CPU")  # DeepSpeed must not get it
    _, ddp_env = launch_command("ddp", ["quickstart"], 2)
    import torch

    if not torch.cuda.is_available():
        assert ddp_env["ACCELERATE_USE_CPU"] == "1"  # true multi-process CPU over gloo


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_7b_recipe_fits_every_preset_on_8_gpus(name):
    recipe = load_recipe("llama2_7b_multigpu")
    preset = get_preset(name)
    check_launch(recipe, preset.strategy, preset.shards_parameters, 8, name)


def test_checks_name_the_key():
    recipe = load_recipe("quickstart", ["output_dir=/tmp/x", "train.eval_batches=3"])
    with pytest.raises(SparsetuneError, match="train.eval_batches=3"):
        check_launch(recipe, "deepspeed", True, 2, "zero3")
    check_launch(recipe, "deepspeed", False, 2, "zero2")  # ZeRO-2 keeps full parameters: any eval count works
