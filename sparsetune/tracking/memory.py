"""Peak memory per rank between two log steps, reduced over ranks for metrics.jsonl, W&B and the progress bar.

Every log step each rank reads its own peak since the previous log and the ranks' values are reduced to their max
and mean (the max is what decides an out-of-memory; the mean shows whether the ranks hold the same share):

  memory/peak_rss_gb_max, _mean        the process's resident set (host RAM, on every device: the CPU engines' whole
                                       footprint, and what zero3_offload moves to the host)
  memory/allocated_gb_max, _mean       CUDA: torch.cuda.max_memory_allocated (tensors)
  memory/reserved_gb_max, _mean        CUDA: torch.cuda.max_memory_reserved (the caching allocator's pool)
  memory/setup_peak_rss_gb_max, _mean  once, in the first log: the peak before the first step (loading, surgery,
                                       wrapping: a model loaded whole on each rank before it is sharded peaks here)

The resident set has no "peak since" counter in the kernel, so a light background thread samples it (every
`interval_s`, /proc/self/statm through psutil); the kernel's lifetime peak (getrusage ru_maxrss) makes the window
exact whenever the window set a new lifetime high, which is when a peak matters most.
"""

from __future__ import annotations

import resource
import sys
import threading
import weakref
from collections.abc import Callable

import psutil
import torch

GB = 1024**3


def current_rss() -> int:
    """This process's resident set now, in bytes."""
    return psutil.Process().memory_info().rss


def lifetime_peak_rss() -> int:
    """The kernel's peak resident set of this process since it started, in bytes (ru_maxrss: KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _Sampled:
    """The sampler thread's state, shared with the monitor (the thread holds no reference to the monitor, so a
    monitor that is dropped stops its thread)."""

    def __init__(self, rss: int):
        self.lock = threading.Lock()
        self.peak = rss
        self.stop = threading.Event()

    def run(self, interval_s: float) -> None:
        process = psutil.Process()
        while not self.stop.wait(interval_s):
            rss = process.memory_info().rss
            with self.lock:
                self.peak = max(self.peak, rss)


class MemoryMonitor:
    """This rank's peak memory per log window. Start it where the windows start (the step loop); `window()` returns
    the local peaks since the previous call (in GB) and starts the next window."""

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.02):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._lifetime = lifetime_peak_rss()
        self._setup: dict[str, float] | None = {"setup_peak_rss_gb": max(self._lifetime, current_rss()) / GB}
        if self.cuda:
            self._setup["setup_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sampled = _Sampled(current_rss())
        self._thread = threading.Thread(target=self._sampled.run, args=(interval_s,), daemon=True,
                                        name="sparsetune-memory")
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._sampled.stop.set)

    def window(self) -> dict[str, float]:
        """Local peaks (GB) since the previous call or the start; the first call adds the setup peak."""
        rss, lifetime = current_rss(), lifetime_peak_rss()
        with self._sampled.lock:
            peak = max(self._sampled.peak, rss)
            self._sampled.peak = rss
        if lifetime > self._lifetime:  # the lifetime high was set in this window: it is the window's exact peak
            peak = max(peak, lifetime)
        self._lifetime = lifetime
        out = {"peak_rss_gb": peak / GB}
        if self.cuda:
            out["allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            out["reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / GB
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._setup is not None:
            out, self._setup = {**out, **self._setup}, None
        return out

    def close(self) -> None:
        self._finalizer()
        self._thread.join(timeout=1.0)

    def log_metrics(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, rank: int = 0,
                    world: int = 1) -> dict[str, float]:
        """This window's peaks, each reduced over ranks to `memory/NAME_max` and `memory/NAME_mean`. Every rank
        calls it (a collective when world > 1)."""
        return reduce_over_ranks(self.window(), reduce_sum, rank, world)


def reduce_over_ranks(local: dict[str, float], reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None,
                      rank: int, world: int) -> dict[str, float]:
    """{memory/NAME_max, memory/NAME_mean} from each rank's `local` values. The ranks' values are gathered with the
    one collective every engine has, a sum: each rank writes its row of a (world x names) table of zeros. Every rank
    must pass the same names in the same order (the first window's setup peaks are on every rank)."""
    names = list(local)
    table = torch.zeros(world, len(names), dtype=torch.float64)
    table[rank] = torch.tensor([local[n] for n in names], dtype=torch.float64)
    if world > 1 and reduce_sum is not None:
        table = reduce_sum(table).cpu()
    out = {}
    for i, name in enumerate(names):
        out[f"memory/{name}_max"] = float(table[:, i].max())
        out[f"memory/{name}_mean"] = float(table[:, i].mean())
    return out


def memory_postfix(metrics: dict[str, float]) -> str:
    """The progress bar's memory: the largest rank's peak (CUDA: allocated; else the resident set)."""
    key = "memory/allocated_gb_max" if "memory/allocated_gb_max" in metrics else "memory/peak_rss_gb_max"
    return f"mem={metrics[key]:.2f}GB" if key in metrics else ""
