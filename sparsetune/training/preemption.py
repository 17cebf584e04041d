"""Preemption: SIGTERM / SIGINT ask the run to checkpoint at the next step boundary and exit 0;
a second signal aborts at once. Copies of a first SIGTERM that arrive within DUPLICATE_WINDOW_S of it (a
scheduler signalling every process of a job while the launchers forward it too) count as the same request. A
SIGINT is a person's Ctrl-C, delivered once per press: a second one always aborts, as the first one's message says
(under `--launch` the workers run in their own session and get each press from the launcher, as a SIGTERM).
"""

from __future__ import annotations

import os
import signal
import time

from sparsetune.console import notice

DUPLICATE_WINDOW_S = 3.0


class PreemptionGuard:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionGuard:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. run from a notebook worker): no handlers
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if (self.requested and signum == signal.SIGTERM
                and time.monotonic() - self._first_at < DUPLICATE_WINDOW_S):
            return  # the same preemption delivered along several paths
        if self.requested:
            notice(f"second {signal.Signals(signum).name}, aborting now (no checkpoint)", err=True)
            os._exit(128 + signum)
        self.requested = True
        self._first_at = time.monotonic()
        self.signal_name = signal.Signals(signum).name
        again = ("press Ctrl-C again to abort at once" if signum == signal.SIGINT else
                 f"send it again to abort at once; copies arriving within {DUPLICATE_WINDOW_S:g} s count as this one")
        notice(f"{self.signal_name} received: saving a checkpoint at the end of this step ({again})", err=True,
               fresh_line=True)

    def should_stop(self, step: int) -> bool:
        """Whether a stop was requested (checked at every step boundary)."""
        return self.requested
