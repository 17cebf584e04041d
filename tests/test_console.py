"""One console: every `sparsetune: ` line is printed by `sparsetune.console.notice`, nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import sparsetune
from sparsetune import console

PACKAGE = Path(sparsetune.__file__).parent


def _text(node: ast.AST) -> str:
    """The literal text at the start of a string or f-string argument."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _text(node.values[0])
    return ""


def test_only_the_console_prints_sparsetune_lines():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(console.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
                    and any(_text(arg).lstrip("\n").startswith("sparsetune: ") for arg in node.args)):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, "print `sparsetune: ...` through sparsetune.console.notice: " + ", ".join(found)


def test_notice_prints_one_flushed_line_and_stays_quiet_off_the_main_process(capsys):
    console.notice("resuming from X")
    console.notice("not on this rank", main=False)
    console.notice("SIGTERM received", err=True, fresh_line=True)
    out, err = capsys.readouterr()
    assert out == "sparsetune: resuming from X\n"
    assert err == "\nsparsetune: SIGTERM received\n"
