"""Bitwise resume on the GPU: the CUDA generator's state (LoRA dropout draws from it on the GPU) goes into the
checkpoint and comes back, as tests/checkpoint/test_resume.py shows for the CPU generators.

In-process runs (train_tiny), as the CPU resume tests; mixed precision stays `auto` (bf16 on a GPU).
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsetune.checkpoint.store import CheckpointStore
from tests.checkpoint.helpers import SCHEDULE, assert_same_weights, final_weights, train_losses
from tests.e2e_helpers import preempt_at, train_steps, train_tiny

pytestmark = [pytest.mark.cuda, pytest.mark.e2e]

ARGS = [*SCHEDULE, "train.max_steps=8", "peft.method=lora", "peft.lora.r=4", "peft.lora.dropout=0.1",
        "wandb.mode=disabled"]


def test_stop_and_resume_with_cuda_dropout_equals_the_straight_run_bitwise(tiny_model_dirs, tmp_path, monkeypatch):
    model = tiny_model_dirs["llama"]
    straight, again, stopped = tmp_path / "straight", tmp_path / "again", tmp_path / "stopped"
    assert train_tiny(model, straight, *ARGS) == 0
    assert train_tiny(model, again, *ARGS) == 0
    # The control: two uninterrupted runs agree bitwise on this GPU (else a resume could not be judged bitwise).
    assert train_losses(again) == train_losses(straight)
    assert_same_weights(final_weights(again)[1], final_weights(straight)[1])

    with monkeypatch.context() as patch:
        preempt_at(patch, 3)
        assert train_tiny(model, stopped, *ARGS) == 0
    ckpt = CheckpointStore(stopped).latest_complete()
    assert ckpt.name == "step-00000003"
    saved = json.loads((ckpt / "rng_state_rank0.json").read_text())
    assert len(saved["cuda"]) == torch.cuda.device_count()
    # Dropout drew from the CUDA generator in steps 1-3: its state is no longer the seeded one the resumed
    # process starts from, so a resume that lost it would draw other masks.
    torch.cuda.manual_seed_all(0)  # train.seed
    assert saved["cuda"][0] != torch.cuda.get_rng_state().tolist()

    assert train_tiny(model, stopped, *ARGS, "--resume") == 0
    assert train_steps(stopped) == list(range(1, 9))
    assert train_losses(stopped) == train_losses(straight)  # exact, not approximate
    assert_same_weights(final_weights(stopped)[1], final_weights(straight)[1])
