"""Where sparsetune caches what it builds at first use (converted models, the default corpus)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$SPARSETUNE_CACHE, else $XDG_CACHE_HOME/sparsetune, else ~/.cache/sparsetune."""
    root = os.environ.get("SPARSETUNE_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsetune"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
