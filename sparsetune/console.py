"""What sparsetune says: the one-line notices of every command (`sparsetune: ...`), kept apart from the code that
decides and measures (the tables of `eval` are evaluation/tables.py's).

Every `sparsetune: ` line goes through `notice`; a process that is not the main one of a launch passes
`main=False` where only rank 0 should speak. This module imports nothing of sparsetune, so any layer may print
through it at no import cost.
"""

from __future__ import annotations

import sys

PREFIX = "sparsetune: "


def notice(message: str, *, main: bool = True, err: bool = False, fresh_line: bool = False) -> None:
    """Print `sparsetune: MESSAGE` and flush at once (it must appear before a long step, or before the process
    leaves). `main=False`: say nothing (a rank other than 0, where only rank 0 speaks). `err`: on stderr (a signal,
    an interruption, a watchdog). `fresh_line`: start on a new line (after a progress bar's partial line)."""
    if not main:
        return
    print(("\n" if fresh_line else "") + PREFIX + message, file=sys.stderr if err else sys.stdout, flush=True)
