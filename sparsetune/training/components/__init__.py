"""The features of a run, each a `Component` with one protocol (see base.py and docs/ARCHITECTURE.md).

Every module in this package that defines a `Component` subclass with `build` is picked up by
`build_components`, ordered by `Component.order`: adding a feature is one new file here, no trainer edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from sparsetune.checkpoint.resume import RecipeChange
from sparsetune.recipe.schema import Recipe
from sparsetune.training.components.base import Component


def component_classes() -> list[type[Component]]:
    """Every Component subclass defined in this package, in `order`."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    found: list[type[Component]] = []
    todo = list(Component.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith(__name__ + "."):
            found.append(cls)
    return sorted(found, key=lambda c: (c.order, c.name))


def build_components(recipe: Recipe) -> list[Component]:
    """The components the recipe switches on."""
    return [c for c in (cls.build(recipe) for cls in component_classes()) if c is not None]


def judge_resume(change: RecipeChange) -> None:
    """Every feature's verdict on a resume's recipe changes (`Component.on_resume`), in component order."""
    for cls in component_classes():
        cls.on_resume(change)
