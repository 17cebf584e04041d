"""Markdown reference of every recipe key, generated from the schema."""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sparsetune.recipe.schema import ACTIVATIONS, RELUFY_VARIANTS, Recipe


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (list,):
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _relufy_rows(prefix: str) -> list[str]:
    """The relufy section: `activation` chooses the variant; each variant's own keys follow."""
    names = " \\| ".join(f"`{a}`" for a in ACTIVATIONS)
    rows = [f"| `{prefix}activation` | {names} | `\"relu\"` | MLP activation after surgery; the keys below apply to "
            "the activation named in their row. "
            + " ".join(" ".join((v.__doc__ or "").split()) for v in RELUFY_VARIANTS)
            + " |"]
    for activation, variant in zip(ACTIVATIONS, RELUFY_VARIANTS):
        for row in _rows(variant, prefix):
            if not row.startswith(f"| `{prefix}activation`"):
                rows.append(row[:-2] + f" (only with `activation: {activation}`) |")
    return rows


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, key + ".")
            continue
        if name == "relufy" and model is Recipe:
            rows += _relufy_rows(key + ".")
            continue
        if field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default
        shown = "required" if default is PydanticUndefined else f"`{json.dumps(default)}`"
        inner = typing.get_args(ann)
        if typing.get_origin(ann) is list and inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            sub = ", ".join(f"`{n}`: {f.description}" for n, f in inner[0].model_fields.items())
            rows.append(f"| `{key}` | list of stages | {shown} | {field.description} Each stage: {sub} |")
            continue
        rows.append(f"| `{key}` | {_type_name(ann)} | {shown} | {field.description} |")
    return rows


def recipe_reference() -> str:
    return "\n".join([
        "# Recipe keys",
        "",
        "Generated from `sparsetune/recipe/schema.py` by `python scripts/gen_recipe_docs.py`; do not edit by hand.",
        "Every key can be overridden on the command line: `sparsetune train RECIPE.yaml train.max_steps=20`.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
        *_rows(Recipe),
        "",
    ])
