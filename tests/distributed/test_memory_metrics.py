"""Peak memory per rank in a 2-process run's logs (tracking/memory.py): the shared 2-process DDP run (conftest's
`runs.ddp_full`, launched once per session) carries each log step's max and mean over ranks in metrics.jsonl and in
its offline W&B run."""

from __future__ import annotations

import pytest

from tests.distributed.launching import STEPS
from tests.e2e_helpers import read_wandb_run, train_logs

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

FIELDS = ("peak_rss_gb",)  # CPU: the resident set (CUDA adds allocated_gb and reserved_gb)


@pytest.mark.xdist_group("full")
def test_two_process_run_logs_peak_memory_per_rank(runs):
    run = runs.ddp_full().run
    logs = train_logs(run)
    assert [m["step"] for m in logs] == list(range(1, STEPS + 1))
    for m in logs:
        for name in FIELDS:
            # a rank's resident set holds torch at least (hundreds of MB); the max is the largest rank's
            assert 0.1 < m[f"memory/{name}_mean"] <= m[f"memory/{name}_max"] < 64, m
    # the peak before the first step (load, surgery, wrapping) is reported once, in the first log
    assert logs[0]["memory/setup_peak_rss_gb_max"] >= logs[0]["memory/setup_peak_rss_gb_mean"] > 0.1
    assert not any("memory/setup_peak_rss_gb_max" in m for m in logs[1:])

    wandb_dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_dirs) == 1
    history = [row for row in read_wandb_run(wandb_dirs[0])["history"] if "train/loss" in row]
    assert [row["_step"] for row in history] == [m["step"] for m in logs]
    for row, m in zip(history, logs):
        for name in FIELDS:
            for stat in ("max", "mean"):
                assert row[f"memory/{name}_{stat}"] == pytest.approx(m[f"memory/{name}_{stat}"])
