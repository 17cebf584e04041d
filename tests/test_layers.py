"""The layer table of docs/ARCHITECTURE.md, held against the code: every `sparsetune.` import (at the top of a file or
inside a function) points to the same layer or one below, except the ones the table's exceptions name with their
reason. The table is read from the doc itself, so the doc and the code cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import sparsetune

PACKAGE = Path(sparsetune.__file__).parent
DOC = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
IMPORT = re.compile(r"^\s*(?:from\s+(sparsetune[\w.]*)\s+import|import\s+(sparsetune[\w.]*))", re.M)


def layer_table() -> dict[str, int]:
    """'sparsetune/…' path prefix (a package folder or a .py file) -> its layer, from the doc's table rows
    `| N | `a/`, `b.py` | ... |`."""
    table = {}
    for row in re.finditer(r"^\| (\d+) \| ([^|]+) \|", DOC.read_text(), re.M):
        for name in re.findall(r"`([^`]+)`", row.group(2)):
            table[name.rstrip("/")] = int(row.group(1))
    return table


def allowed_upward() -> set[tuple[str, str]]:
    """(importing file, imported module) pairs the doc names as the exceptions, `file` -> `module`."""
    section = DOC.read_text().split("Imports that reach up", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`(sparsetune/[\w/.]+\.py)` -> `(sparsetune[\w.]*)`", section))


def layer_of(path: str, table: dict[str, int]) -> int | None:
    """The layer of a path relative to sparsetune/ ('training/trainer.py', 'recipe/section'): the longest prefix in
    the table."""
    best = None
    for name, layer in table.items():
        stem = name[:-3] if name.endswith(".py") else name
        if path == stem or path.startswith(stem + "/") or path == name:
            if best is None or len(stem) > best[0]:
                best = (len(stem), layer)
    return None if best is None else best[1]


def test_every_module_has_a_layer_and_no_import_reaches_up():
    table = layer_table()
    assert len(table) > 15, table
    unplaced, upward = [], []
    exceptions = allowed_upward()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ("__init__.py", "__main__.py") or "/templates/" in rel:
            continue  # the lazy public API and `python -m` sit above everything; templates are copied out
        own = layer_of(rel[:-3], table)
        if own is None:
            unplaced.append(rel)
            continue
        for match in IMPORT.finditer(path.read_text()):
            module = match.group(1) or match.group(2)
            target = layer_of(module.removeprefix("sparsetune").lstrip(".").replace(".", "/"), table)
            if target is not None and target > own and (f"sparsetune/{rel}", module) not in exceptions:
                upward.append(f"{rel} (layer {own}) imports {module} (layer {target})")
    assert unplaced == [], "add these to docs/ARCHITECTURE.md's layer table"
    assert upward == []
