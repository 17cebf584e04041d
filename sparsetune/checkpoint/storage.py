"""What a failed write really raised, told in a few words: the one place that knows how torch, safetensors and
the OS report a full, read-only or unwritable disk.

Seen on a real full tmpfs and a real read-only mount (tests/faults/test_real_storage.py):
  OS / Python       OSError(ENOSPC) "No space left on device", OSError(EROFS), PermissionError
  torch.save        RuntimeError "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" (full)
                    RuntimeError "... open file failed with strerror: Read-only file system"
                    RuntimeError "... PytorchStreamWriter failed writing file data/0: file write failed"
  safetensors       SafetensorError "Error while serializing: I/O error: No space left on device (os error 28)"
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
# torch's stream writer does not say why a write failed; these are its words for a short write
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def _free(path: Path | None) -> int | None:
    for folder in [path, *(path.parents if path else [])]:
        if folder is not None and folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def storage_failure(exc: BaseException, where: Path | None = None) -> str | None:
    """'No space left on device (FILE)' and the like when `exc` is a failed write to storage, else None.
    `where`: the file or folder being written, for the free-space check when the library does not say."""
    if isinstance(exc, OSError) and exc.errno in _ERRNOS:
        return f"{exc.strerror or os.strerror(exc.errno)}" + (f" ({exc.filename})" if exc.filename else "")
    text = str(exc)
    code = re.search(r"os error (\d+)", text)
    if code and int(code.group(1)) in _ERRNOS:
        path = re.search(r'at path "([^"]+)"', text)
        return os.strerror(int(code.group(1))) + (f" ({path.group(1)})" if path else "")
    strerror = re.search(r"strerror: ([^\n]+)", text)
    if isinstance(exc, RuntimeError) and strerror:
        return strerror.group(1).strip()
    if isinstance(exc, RuntimeError) and any(s in text for s in _TORCH_SHORT_WRITE):
        free = _free(Path(where) if where else None)
        if free is not None and free < 64 * 1024 * 1024:
            return f"No space left on device (a write stopped short; {free:,} bytes free)"
        return "a write stopped short (torch: " + text.strip().splitlines()[0][-80:] + ")"
    return None


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status), else by setting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_file_modes(folder: Path) -> None:
    """Give every file under `folder` the mode the user's umask gives a new ordinary file (0644 under umask 022,
    0600 under 077). safetensors writes through a private temporary file and leaves 0600 (model.safetensors,
    predictors.safetensors), so a teammate could not read the weights of an export or a checkpoint that every other
    file of lets them read. Called on a finished folder before it is renamed into place."""
    mode = 0o666 & ~umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o7777) != mode:
            os.chmod(path, mode)


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters), for one-line errors."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
