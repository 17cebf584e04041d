"""The built-in offline corpus: docstrings of the installed Python standard library.

Real English technical prose, present on every machine that has Python, and nothing
third-party committed to the repo. Built at first use (a few seconds) by parsing the
stdlib sources with `ast` (nothing is imported), one document per module, and cached as
JSONL. A stable hash of the module path puts ~5% of modules in the held-out split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

from sparsetune.paths import cache_dir, unwritable_cache

CORPUS_ALIAS = "stdlib-docs"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
_MIN_CHARS = 200
_EVAL_BUCKETS = 20  # 1 in 20 modules is held out


def _module_document(source: str) -> str | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                docs.append(doc.strip())
    text = "\n\n".join(docs)
    return text if len(text) >= _MIN_CHARS else None


def _is_eval(rel_path: str) -> bool:
    return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % _EVAL_BUCKETS == 0


def build_corpus(out_dir: Path) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl ({"text", "source"} per line) into out_dir."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in stdlib.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(stdlib).parts[:-1]))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    tmp = {k: v.with_suffix(f".tmp{os.getpid()}") for k, v in paths.items()}
    with open(tmp["train"], "w") as train, open(tmp["eval"], "w") as held_out:
        for path in files:
            rel = path.relative_to(stdlib).as_posix()
            try:
                doc = _module_document(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
            if doc:
                line = json.dumps({"text": doc, "source": rel}) + "\n"
                (held_out if _is_eval(rel) else train).write(line)
    for key in paths:
        os.replace(tmp[key], paths[key])
    return paths


def corpus_files() -> dict[str, Path]:
    """Paths of the cached corpus splits, building them on first use."""
    version = ".".join(map(str, sys.version_info[:3]))
    out = cache_dir("data", f"{CORPUS_ALIAS}-py{version}")
    paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    if not all(p.is_file() for p in paths.values()):
        try:
            paths = build_corpus(out)
        except OSError as exc:  # the folder exists but cannot be written (read-only cache, full disk)
            for leftover in out.glob(f"*.tmp{os.getpid()}"):
                leftover.unlink(missing_ok=True)
            raise unwritable_cache(out, exc) from None
    return paths
