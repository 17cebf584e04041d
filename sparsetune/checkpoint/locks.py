"""One writer per run folder and per export folder: an exclusive, OS-level lock held for the whole command.

The lock is `filelock`'s FileLock (fcntl `flock` on POSIX): the kernel drops it when its holder exits or dies
(SIGKILL, OOM, a node reboot), so a lock is never stale: the next process simply gets it. The holder writes who
it is (host, pid, start time, command) into the lock file, so a second process can name it in its one-line
refusal. What this guarantees: between processes of one machine, always; across machines on a shared filesystem,
wherever that filesystem implements `flock` across clients (NFSv4, Lustre mounted with `flock`, GPFS, CephFS);
where it does not, the lock only excludes processes of the same node. Only the main process of a launch takes it.

  run folder:     <output_dir>/.sparsetune.lock           (kept: a hidden, empty-once-released file of the run)
  export folder:  <parent>/.<name>.sparsetune-lock        (removed when the export finishes)
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from sparsetune.errors import SparsetuneError

RUN_LOCK = ".sparsetune.lock"


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (its details are not readable)"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            + (f": {info['command']}" if info.get("command") else ""))


class FolderLock:
    """An exclusive lock on `path`, taken without waiting; `what` names the folder in the refusal."""

    def __init__(self, path: Path, what: str, remove_on_release: bool = False):
        self.path = Path(path)
        self.what = what
        self.remove_on_release = remove_on_release
        self.created_file = False  # the lock file did not exist before this process took the lock
        self._lock = None

    def acquire(self, command: str = "") -> FolderLock:
        from filelock import FileLock, Timeout

        self.created_file = not self.path.exists()
        for _ in range(3):  # a lock file removed by its previous holder between our open and our lock: retry
            lock = FileLock(str(self.path), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise SparsetuneError(f"{self.what} is in use by another sparsetune process "
                                      f"({_holder_text(self.path)}); wait for it to finish or stop it, or "
                                      "choose another folder") from None
            if self._same_file(lock):
                break
            lock.release()
        else:
            raise SparsetuneError(f"{self.what}: could not take the lock {self.path}; another process keeps "
                                  "replacing it")
        self._lock = lock
        try:  # who holds it, for the refusal a second process prints (the lock works without it: a full disk)
            with open(self.path, "r+") as f:
                f.truncate()
                f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        except OSError:
            pass
        return self

    def _same_file(self, lock) -> bool:
        fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
        if fd is None:
            return True
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def release(self, remove: bool = False) -> None:
        """Let go of the lock; `remove` (or remove_on_release) also deletes the lock file, while still held."""
        if self._lock is None:
            return
        try:
            if self.remove_on_release or remove:  # removed while still held, so nobody locks a file about to vanish
                self.path.unlink(missing_ok=True)
            else:
                with open(self.path, "r+") as f:
                    f.truncate()
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def export_lock(out: Path) -> FolderLock:
    return FolderLock(out.parent / f".{out.name}.sparsetune-lock", f"export folder {out}", remove_on_release=True)


def run_lock(run_dir: Path) -> FolderLock:
    return FolderLock(run_dir / RUN_LOCK, f"output_dir {run_dir}")
