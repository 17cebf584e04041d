"""Preemption: SIGTERM / SIGINT ask the run to checkpoint at the next step boundary and exit 0;
a second signal aborts at once. Copies of the first signal that arrive within DUPLICATE_WINDOW_S of it (a
scheduler signalling every process of a job while the launchers forward it too) count as the same request.

Test hooks (environment variables, used by the test suite to place failures exactly):
  SPARSETUNE_TEST_PREEMPT_AT_STEP=k   behave as if SIGTERM arrived during step k
  SPARSETUNE_TEST_KILL_IN_SAVE=k      SIGKILL this process half-way through writing checkpoint k
"""

from __future__ import annotations

import os
import signal
import sys
import time

DUPLICATE_WINDOW_S = 3.0


class PreemptionGuard:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._test_step = int(os.environ.get("SPARSETUNE_TEST_PREEMPT_AT_STEP", "0") or 0)

    def install(self) -> "PreemptionGuard":
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
        if self.requested and time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
            return  # the same preemption delivered along several paths
        if self.requested:
            print(f"sparsetune: second {signal.Signals(signum).name}, aborting now (no checkpoint)",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = True
        self._first_at = time.monotonic()
        self.signal_name = signal.Signals(signum).name
        print(f"\nsparsetune: {self.signal_name} received: saving a checkpoint at the end of this step "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    def should_stop(self, step: int) -> bool:
        if self._test_step and step == self._test_step and not self.requested:
            self.requested, self.signal_name = True, "SIGTERM (test hook)"
        return self.requested


def maybe_kill_in_save(step: int) -> None:
    """Test hook: die like a preempted node half-way through writing checkpoint `step`."""
    if os.environ.get("SPARSETUNE_TEST_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
