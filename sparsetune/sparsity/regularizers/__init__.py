"""Sparsity-inducing penalties on the MLP activation a (shape [..., tokens, neurons]), one module each.

A regularizer is a module in this package named after its `regularizer.type` that defines
`penalty(a, token_mask) -> scalar` (a per-layer value averaged over real tokens; see _common.masked_token_mean).
Adding one is adding a file: the recipe accepts its name and the run uses it, with no other edit.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

Regularizer = Callable  # (a: Tensor, token_mask: Tensor | None) -> Tensor


def regularizer_names() -> list[str]:
    """Every `regularizer.type` the recipe accepts (module files here, read without importing torch)."""
    return ["none", *sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))]


def regularizer_docs() -> dict[str, str]:
    """name -> the first line of its module docstring after "name: " (for the recipe reference)."""
    docs = {}
    for name in regularizer_names()[1:]:
        doc = ast.get_docstring(ast.parse((Path(__file__).parent / f"{name}.py").read_text())) or ""
        docs[name] = doc.split("\n\n")[0].replace("\n", " ").removeprefix(f"{name}: ").rstrip(".")
    return docs


def get_regularizer(name: str) -> Regularizer | None:
    """The penalty of `regularizer.type` (None for "none")."""
    if name == "none":
        return None
    return importlib.import_module(f"{__name__}.{name}").penalty
