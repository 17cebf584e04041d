"""The end of a launched worker: its files are written, so a process-group teardown that never returns must not
turn a finished run into a hung launch.

gloo's teardown (``destroy_process_group`` and the destructors of the objects that hold the group) now and then
waits forever on a peer that has already exited: seen once in CI, rank 0 idle in native code after its run was
checkpointed and its W&B run finished, until the launcher's caller gave up. A worker therefore tears the group
down under a watchdog and then leaves without the interpreter's own teardown (whose destructors are where the
wait was seen)."""

from __future__ import annotations

import os
import sys
import threading

from sparsetune.console import notice

TEARDOWN_SECONDS = 60.0


def _leave(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def arm(code: int, seconds: float = TEARDOWN_SECONDS, rank: int | None = None) -> threading.Timer:
    """End this process with `code` if it is still alive `seconds` from now (a daemon timer)."""
    def expire() -> None:
        who = f"rank {rank}" if rank is not None else "this process"
        notice(f"{who}: the process group's teardown did not end within {seconds:.0f} s after the run's files were "
               f"written; leaving with exit {code}", err=True)
        _leave(code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def close_and_leave(close, code: int, rank: int | None = None, seconds: float = TEARDOWN_SECONDS) -> None:
    """Run `close` (the process group's teardown) under the watchdog, then exit with `code` at once: no object
    that holds the group is ever destroyed, so no destructor can wait on a peer that is gone."""
    arm(code, seconds, rank)
    try:
        close()
    finally:
        _leave(code)
