"""Where sparsetune caches what it builds at first use (converted models, the default corpus), and the checks
on path strings from the user that no filesystem call would accept."""

from __future__ import annotations

import os
from pathlib import Path

from sparsetune.errors import SparsetuneError

NAME_MAX = 255  # bytes in one file or folder name on Linux and macOS filesystems


def check_path_text(value: str, key: str) -> None:
    """Refuse a path string the OS rejects whatever the disk holds: a NUL byte, or a name longer than NAME_MAX.

    Python raises ValueError / OSError(ENAMETOOLONG) for them from deep inside whatever touches the path first.
    `key` says where the string came from, e.g. "data.path =" -> "data.path = '/x\\x00' holds a NUL byte..."."""
    shown = repr(value if len(value) <= 80 else f"{value[:48]}...{value[-24:]}")
    if "\x00" in value:
        raise SparsetuneError(f"{key} {shown} holds a NUL byte (\\x00), which no file name can contain")
    for name in value.split("/"):
        if len(os.fsencode(name)) > NAME_MAX:
            raise SparsetuneError(f"{key} {shown} has a name of {len(os.fsencode(name))} bytes; a file or folder "
                                  f"name is at most {NAME_MAX} bytes")


def cache_root() -> tuple[Path, str]:
    """(cache folder, where it came from): $SPARSETUNE_CACHE, else $XDG_CACHE_HOME/sparsetune, else
    ~/.cache/sparsetune."""
    for var, sub in (("SPARSETUNE_CACHE", ""), ("XDG_CACHE_HOME", "sparsetune")):
        if os.environ.get(var):
            return Path(os.environ[var]) / sub, var
    return Path.home() / ".cache" / "sparsetune", "the default cache folder"


def unwritable_cache(folder: Path, exc: OSError) -> SparsetuneError:
    """The one-line error for a cache folder that cannot be created or written, with how to fix it."""
    _, source = cache_root()
    origin = f"{source}={os.environ[source]}" if source in os.environ else source
    return SparsetuneError(f"{origin}: cannot write the sparsetune cache folder {folder} ({exc.strerror or exc}); "
                           "point SPARSETUNE_CACHE at a writable folder")


def cache_dir(*parts: str) -> Path:
    """The cache folder `parts` under `cache_root()`, created if needed (one-line error when it cannot be)."""
    root, source = cache_root()
    check_path_text(str(root), f"{source} =")
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only filesystem, no permission, a file where a folder belongs
        raise unwritable_cache(path, exc) from None
    return path
