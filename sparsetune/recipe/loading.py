"""Read a recipe: YAML file (or built-in name) + dotted KEY=VALUE overrides -> validated Recipe."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sparsetune.errors import SparsetuneError
from sparsetune.paths import check_path_text
from sparsetune.recipe.schema import ACTIVATIONS, RELUFY_VARIANTS, Recipe


def builtin_recipes_dir() -> Path:
    """Folder of the recipes shipped with sparsetune (top-level `recipes/`, installed as `sparsetune.recipes`)."""
    source_tree = Path(__file__).resolve().parents[2] / "recipes"
    if source_tree.is_dir():
        return source_tree
    return Path(str(resources.files("sparsetune.recipes")))


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> file."""
    return {p.stem: p for p in sorted(builtin_recipes_dir().glob("*.yaml"))}


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a built-in recipe (e.g. `quickstart`)."""
    check_path_text(name_or_path, "recipe")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = builtin_recipes()
    if name_or_path in builtin:
        return builtin[name_or_path]
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        except OSError:  # an unreadable folder: still a folder
            inside = []
        hint = f" (it holds {', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})" if inside else ""
        raise SparsetuneError(f"recipe {name_or_path} is a folder, not a recipe file{hint}; name a .yaml file")
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise SparsetuneError(f"recipe file not found: {name_or_path}")
    raise SparsetuneError(
        f"no recipe file or built-in recipe named {name_or_path!r}; built-in recipes: {', '.join(builtin)}"
    )


def _duplicate_key(node: yaml.Node, where: tuple[str, ...] = (), seen: set[int] | None = None) -> str | None:
    """The first key (in file order) written twice in one mapping of the composed YAML `node`, as
    "'train.max_steps' is written twice (lines 3 and 5)". PyYAML itself keeps the last value silently."""
    seen = set() if seen is None else seen
    if id(node) in seen or not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return None  # a scalar, or an alias (*name) to a node already checked
    seen.add(id(node))
    first: dict[str, int] = {}
    for i, item in enumerate(node.value):
        if isinstance(node, yaml.SequenceNode):
            path, child = (*where, str(i)), item
        elif item[0].tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: the keys written here override, by design
            path, child = where, item[1]
        else:
            name, line = str(item[0].value), item[0].start_mark.line + 1
            if name in first:
                return f"{'.'.join((*where, name))!r} is written twice (lines {first[name]} and {line})"
            first[name] = line
            path, child = (*where, name), item[1]
        if duplicate := _duplicate_key(child, path, seen):
            return duplicate
    return None


def _recipe_text(path: Path) -> str:
    """The recipe file as text: UTF-8 (with or without a byte-order mark), else a one-line error saying where."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SparsetuneError(f"recipe {path} could not be read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SparsetuneError(f"recipe {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                              "save it as UTF-8") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """The recipe file's mapping; a one-line SparsetuneError for bytes that are not UTF-8, invalid YAML, a key
    written twice in one section, or a document that is not a mapping."""
    text = _recipe_text(path)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters (NUL, BEL...) at once
        node = loader.get_single_node()
        duplicate = _duplicate_key(node) if node is not None else None
        if duplicate:
            raise SparsetuneError(f"recipe {path}: key {duplicate}; write each key once per section")
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise SparsetuneError(f"recipe {path} holds a character YAML does not allow (#x{exc.character:04x} on line "
                              f"{line}): {exc.reason}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SparsetuneError(f"recipe {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SparsetuneError(f"recipe {path} must be a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (numbers, bools, lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SparsetuneError(f"override {item!r} must look like KEY=VALUE, e.g. train.max_steps=20")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SparsetuneError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _fields_at(loc: tuple) -> list[str]:
    """Names of the fields of the section that `loc` (minus its last element) points into."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None:
            args = getattr(annotation, "__args__", ())
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


def _relufy_key_error(loc: tuple, activation: str) -> str:
    """An unknown key in the relufy section of `activation`: say which activation takes it, or the closest."""
    name = str(loc[-1])
    known = list(dict(zip(ACTIVATIONS, RELUFY_VARIANTS))[activation].model_fields)
    owners = [a for a, v in zip(ACTIVATIONS, RELUFY_VARIANTS) if name in v.model_fields]
    if owners:
        return (f"recipe key 'relufy.{name}' does not apply to relufy.activation={activation!r}; it belongs to "
                f"relufy.activation={' or '.join(map(repr, owners))} (keys of {activation}: {', '.join(known)})")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean 'relufy.{close[0]}'?" if close else ""
    return f"unknown recipe key 'relufy.{name}'{hint} (keys of relufy.activation={activation!r}: {', '.join(known)})"


def _shown(value: Any, limit: int = 80) -> str:
    """`value`'s repr, cut short when long (a per-layer list of 128-wide scale lists is no help in one line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming every bad key, with the allowed values or the closest known key."""
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        kind = err["type"]
        if loc[:1] == ("relufy",) and len(loc) > 2 and loc[1] in ACTIVATIONS:  # inside one activation's section
            activation, loc = loc[1], (loc[0], *loc[2:])
            if kind == "extra_forbidden":
                parts.append(_relufy_key_error(loc, activation))
                continue
        key = ".".join(str(p) for p in loc)
        if kind == "union_tag_invalid":
            ctx = err.get("ctx", {})
            parts.append(f"recipe key '{key}.activation' = {ctx.get('tag')!r} is not allowed; expected "
                         f"{ctx.get('expected_tags')}")
        elif kind == "extra_forbidden":
            known = _fields_at(loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            parts.append(f"unknown recipe key {key!r}{hint} (known here: {', '.join(known)})")
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            parts.append(f"recipe key {key!r} = {err['input']!r} is not allowed; expected {expected}")
        elif kind == "missing":
            parts.append(f"recipe key {key!r} is required")
        elif kind == "value_error" and not loc:
            parts.append(err["msg"].removeprefix("Value error, "))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            where = f"recipe key {key!r}" if key else "recipe"
            parts.append(f"{where}: {msg} (got {_shown(err.get('input'))})")
    return f"{source}: " + "; ".join(parts)


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise SparsetuneError(describe_validation_error(exc, source)) from None
    # Paths no filesystem accepts fail here, naming the key, not later inside whatever opens them first.
    for key, value in (("output_dir", recipe.output_dir), ("model.path", recipe.model.path),
                       ("data.path", recipe.data.path), ("data.eval_path", recipe.data.eval_path)):
        if value is not None:
            check_path_text(str(value), f"{source}: recipe key {key!r} =")
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe. Raises SparsetuneError with one clear line on any problem."""
    path = resolve_recipe_path(name_or_path)
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return validate_recipe(data, source=str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
