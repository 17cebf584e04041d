"""The launch's stderr, relayed as it comes, without the tracebacks that follow a worker's one-line error.

A worker that meets bad input says so in one `error: ...` line and exits 2; torch's launcher then prints its own
traceback of the failed worker (`ChildFailedError` and the agent's frames), which says nothing the line did not.
Until a worker has said `error:`, everything passes through at once, chunk by chunk (progress bars included);
afterwards only `error:` and `sparsetune:` lines pass, each error once (every rank says the same). A worker that
fails without an `error:` line (a bug) keeps its whole traceback.
"""

from __future__ import annotations

import os
import threading
from typing import TextIO

KEPT = ("error: ", "sparsetune: ")


def _said(line: str) -> str:
    """What a line says after any progress bar drawn over it with carriage returns."""
    return line.split("\r")[-1]


class ErrorRelay:
    def __init__(self, fd: int, sink: TextIO):
        self.fd, self.sink = fd, sink
        self.errors: list[str] = []  # the workers' `error:` lines, each once, in order
        self._partial = ""  # the current line so far, while passing through
        self._thread = threading.Thread(target=self._run, daemon=True, name="sparsetune-stderr")

    def start(self) -> ErrorRelay:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _write(self, text: str) -> None:
        self.sink.write(text)
        self.sink.flush()

    def _run(self) -> None:
        with os.fdopen(self.fd, "rb", buffering=0) as stream:
            pending = ""
            while chunk := stream.read(65536):
                text = chunk.decode("utf-8", errors="replace")
                if not self.errors:
                    text = self._pass_through(text)
                    if not self.errors:
                        continue
                pending = self._filter(pending + text)
            if pending and self.errors:
                self._filter(pending + "\n")

    def _pass_through(self, text: str) -> str:
        """Write `text` as it comes, up to the end of the first `error:` line; return what follows that line."""
        combined = self._partial + text  # self._partial was written with the previous chunks
        pos = 0
        while (newline := combined.find("\n", pos)) != -1:
            said = _said(combined[pos:newline])
            pos = newline + 1
            if said.startswith("error: "):
                self.errors.append(said)
                self._write(text[: pos - len(self._partial)])
                self._partial = ""
                return combined[pos:]
        self._write(text)
        self._partial = combined[pos:]
        return ""

    def _filter(self, text: str) -> str:
        """After an error: pass only `error:` (once each) and `sparsetune:` lines; return the partial last line."""
        *lines, partial = text.split("\n")
        for line in lines:
            said = _said(line)
            if said.startswith("error: "):
                if said in self.errors:
                    continue
                self.errors.append(said)
            if said.startswith(KEPT):
                self._write(said + "\n")
        return partial
