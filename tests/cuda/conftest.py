"""CUDA tests: `pytest -m cuda` (what scripts/gpu_check.sh runs on a GPU machine); skipped where torch sees no GPU.

The runs several modules compare are session fixtures here, each a child process (tests/cuda/runs.py). Runs made
inside the test process (test_cuda_resume.py) keep the default mixed precision `auto`, bf16 on a GPU, so that they
all agree with each other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cuda.runs import FP32, train_child


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, saying why, where torch sees no CUDA device (CI never has one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fp32_gpu_run(tiny_model_dirs, tmp_path_factory) -> tuple[Path, str]:
    """Full precision on the GPU: the reference of the bf16 run and of the sharded engines' runs."""
    return train_child(tiny_model_dirs["llama"], tmp_path_factory.mktemp("cuda_fp32") / "run", FP32)


@pytest.fixture(scope="session")
def bf16_gpu_run(tiny_model_dirs, tmp_path_factory) -> tuple[Path, str]:
    """bf16 mixed precision on the GPU, with co-trained predictors (so that `eval --dynamic` has predicted masks;
    they observe the forward and change none of the model's losses). The in-training dynamic eval under bf16 is
    test_mixed_precision.py's own run."""
    return train_child(tiny_model_dirs["llama"], tmp_path_factory.mktemp("cuda_bf16") / "run",
                       "train.mixed_precision=bf16", "predictor.enabled=true", "predictor.rank=8",
                       "predictor.dynamic_eval_batches=0")


@pytest.fixture(scope="session")
def cpu_fp32_step(tiny_model_dirs, tmp_path_factory) -> tuple[Path, str]:
    """The same first step in full precision on the CPU of the same machine (the GPU hidden from the child)."""
    return train_child(tiny_model_dirs["llama"], tmp_path_factory.mktemp("cuda_cpu") / "run", FP32,
                       "train.max_steps=1", env={"CUDA_VISIBLE_DEVICES": ""})
