"""`--launch fsdp` and `--launch zero3` with one process on the GPU (NCCL) end where the plain GPU run ends.

The same criteria as the multi-process CPU tests (tests/distributed/test_multiprocess.py): every step's losses
within 1e-4, the held-out perplexity within 1e-4, the final weights within 1% of the distance training moved them.
All three runs are in full precision, so only the engines' float reduction order differs.

With one process sparsetune's engine choice (training/engines.py) is DeepSpeed for zero3, but the plain engine
for fsdp (its own FSDP2 sharding needs several processes); accelerate's state is still FSDP there, so this is the
path a one-GPU `--launch fsdp` takes.
"""

from __future__ import annotations

import re

import pytest

from tests.distributed.launching import STEPS, assert_same_training, final_weights, launched, per_step
from tests.e2e_helpers import logs_with

pytestmark = [pytest.mark.cuda, pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("preset, engine", [("fsdp", "single process"), ("zero3", "DeepSpeed ZeRO-3")])
def test_one_process_sharded_preset_matches_the_plain_gpu_run(tiny_model_dirs, tmp_path, fp32_gpu_run, preset,
                                                              engine):
    reference, _ = fp32_gpu_run
    run = tmp_path / "run"
    proc = launched(tiny_model_dirs["llama"], run, preset, "train.mixed_precision='no'", processes=1)
    assert "on GPU" in proc.stdout, proc.stdout[-2000:]  # the launcher's line: no CPU fallback
    assert re.search(rf"1 process\(es\) on cuda\S* \({re.escape(engine)}\)", proc.stdout), proc.stdout[-2000:]
    got, ref = per_step(run), per_step(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        for key in ("train/loss", "train/lm_loss", "train/reg_loss", "train/sparsity"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-6), (step, key)
    final, ref_final = logs_with(run, "eval/perplexity")[-1], logs_with(reference, "eval/perplexity")[-1]
    assert final["step"] == ref_final["step"] == STEPS
    assert final["eval/perplexity"] == pytest.approx(ref_final["eval/perplexity"], rel=1e-4)
    assert final["eval/sparsity"] == pytest.approx(ref_final["eval/sparsity"], abs=1e-4)
    assert_same_training(final_weights(run), final_weights(reference), tiny_model_dirs["llama"])
