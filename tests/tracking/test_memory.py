"""The per-rank peak memory of a log window (tracking/memory.py): the sampler sees a transient peak, the reduction
gives each name's max and mean over ranks."""

from __future__ import annotations

import time

import torch

from sparsetune.tracking.memory import GB, MemoryMonitor, current_rss, memory_postfix, reduce_over_ranks

MB = 1024**2


def _hold(n_bytes: int, seconds: float) -> None:
    t = torch.ones(n_bytes // 4, dtype=torch.float32)  # ones: every page touched, so resident
    time.sleep(seconds)
    del t


def test_window_sees_a_transient_peak_and_starts_the_next_window():
    monitor = MemoryMonitor("cpu", interval_s=0.01)
    try:
        first = monitor.window()
        assert set(first) == {"peak_rss_gb", "setup_peak_rss_gb"}  # the setup peak comes once
        assert first["setup_peak_rss_gb"] >= first["peak_rss_gb"] * 0.5 > 0
        _hold(300 * MB, 0.2)  # a new lifetime high: exact through ru_maxrss
        base = current_rss()
        assert monitor.window()["peak_rss_gb"] * GB >= base + 250 * MB
        _hold(150 * MB, 0.3)  # below the lifetime high: only the sampler sees it
        base = current_rss()
        peak = monitor.window()
        assert set(peak) == {"peak_rss_gb"}
        assert peak["peak_rss_gb"] * GB >= base + 120 * MB
        # the next window starts after the peak: it is back near the resident set now
        assert monitor.window()["peak_rss_gb"] * GB < base + 60 * MB
    finally:
        monitor.close()
    assert not monitor._thread.is_alive()


def test_reduce_over_ranks_gives_max_and_mean():
    per_rank = [{"peak_rss_gb": 3.0, "allocated_gb": 1.0}, {"peak_rss_gb": 5.0, "allocated_gb": 2.0}]
    tables = []

    def collect(table: torch.Tensor) -> torch.Tensor:  # a sum over ranks, recorded rank by rank
        tables.append(table.clone())
        return table

    for rank, local in enumerate(per_rank):
        reduce_over_ranks(local, collect, rank, 2)
    total = tables[0] + tables[1]
    out = reduce_over_ranks(per_rank[0], lambda t: total, 0, 2)
    assert out == {"memory/peak_rss_gb_max": 5.0, "memory/peak_rss_gb_mean": 4.0,
                   "memory/allocated_gb_max": 2.0, "memory/allocated_gb_mean": 1.5}
    assert memory_postfix(out) == "mem=2.00GB"  # CUDA: allocated
    single = reduce_over_ranks({"peak_rss_gb": 1.25}, None, 0, 1)
    assert single == {"memory/peak_rss_gb_max": 1.25, "memory/peak_rss_gb_mean": 1.25}
    assert memory_postfix(single) == "mem=1.25GB"
