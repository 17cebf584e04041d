"""bf16 mixed precision on the GPU: it trains, every figure is finite, and it computes what full precision does."""

from __future__ import annotations

import math
import re

import pytest

from tests.cuda.runs import train_child
from tests.distributed.launching import STEPS, per_step
from tests.e2e_helpers import logs_with

pytestmark = [pytest.mark.cuda, pytest.mark.e2e]


def test_bf16_run_is_finite_and_starts_at_the_fp32_loss(bf16_gpu_run, fp32_gpu_run, cpu_fp32_step):
    (bf16_dir, bf16_out), (fp32_dir, fp32_out) = bf16_gpu_run, fp32_gpu_run
    for out in (bf16_out, fp32_out):
        assert re.search(r"1 process\(es\) on cuda", out), out[-2000:]
    bf16, fp32 = per_step(bf16_dir), per_step(fp32_dir)
    assert sorted(bf16) == sorted(fp32) == list(range(1, STEPS + 1))
    for step, m in bf16.items():
        for key in ("train/loss", "train/lm_loss", "train/reg_loss", "train/grad_norm", "train/predictor_loss"):
            assert math.isfinite(m[key]), (step, key, m[key])
        assert m["train/skipped_nonfinite"] == 0 and m["train/skipped_steps_total"] == 0, step
    final = logs_with(bf16_dir, "eval/perplexity")[-1]
    assert final["step"] == STEPS and math.isfinite(final["eval/perplexity"]) and 0 < final["eval/sparsity"] < 1

    # Step 1 sees the same weights and the same batch: bf16 autocast only rounds (loose), and it really ran
    # (not bitwise the full-precision value).
    first_bf16, first_fp32 = bf16[1]["train/lm_loss"], fp32[1]["train/lm_loss"]
    assert first_bf16 == pytest.approx(first_fp32, rel=1e-2)
    assert first_bf16 != first_fp32
    # Full precision on the GPU computes what the CPU computes (the CPU run of the same first step).
    cpu_dir, cpu_out = cpu_fp32_step
    assert re.search(r"1 process\(es\) on cpu", cpu_out), cpu_out[-2000:]
    assert first_fp32 == pytest.approx(per_step(cpu_dir)[1]["train/lm_loss"], rel=1e-5)
    # Both precisions train: the language-model loss falls over the 4 steps, by about as much.
    assert bf16[STEPS]["train/lm_loss"] < first_bf16 and fp32[STEPS]["train/lm_loss"] < first_fp32
    assert bf16[STEPS]["train/lm_loss"] == pytest.approx(fp32[STEPS]["train/lm_loss"], rel=5e-2)


def test_bf16_run_measures_the_dynamic_activation_perplexities(tiny_model_dirs, tmp_path):
    """The predictors' in-training dynamic eval (masked MLPs as sparse products) under bf16 autocast. On the CPU
    this fails: torch has no bf16 sparse CSR matmul there (`addmm_out_sparse_csr_impl_mkl`)."""
    run, _ = train_child(tiny_model_dirs["llama"], tmp_path / "run", "train.mixed_precision=bf16",
                         "predictor.enabled=true", "predictor.rank=8", "train.max_steps=2")
    final = logs_with(run, "eval/dynamic/dense/perplexity")[-1]
    assert final["step"] == 2
    dense, oracle, predicted = (final[f"eval/dynamic/{m}/perplexity"] for m in ("dense", "oracle", "predicted"))
    assert all(math.isfinite(v) for v in (dense, oracle, predicted))
    # ReLU's oracle masks skip exact zeros only; bf16 rounds the dense and the sparse products differently
    assert oracle == pytest.approx(dense, rel=1e-2)
    assert dense == pytest.approx(final["eval/perplexity"], rel=1e-2)
    assert 0 < final["eval/dynamic/predicted/sparsity"] < 1
