"""Command-line options declared once, on the fields of a command's typed arguments (a dataclass such as EvalArgs).

    batches: int = option("--batches", 16, type=POSITIVE, help="...")

is a dataclass field (default 16) that also carries its option. `add_options` builds a command's parser from those
fields, in field order (the order of --help), and `from_namespace` turns the parsed command line back into the
dataclass: a new option is one new field, with nothing to add to cli.py. Fields without an option (values only a
caller passes) are left out of the parser and keep their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

CLI = "cli"  # the field metadata key that holds a field's Option


@dataclass(frozen=True)
class Group:
    """A section of a command's --help (an argparse argument group); `title` is its heading."""

    title: str


@dataclass(frozen=True)
class Option:
    """How one field is spelled on the command line. Its default is the field's own."""

    flag: str  # "--seq-len", or the name of a positional argument ("model")
    help: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Sequence | None = None
    nargs: str | None = None
    const: Any = None
    metavar: str | None = None
    group: Group | None = None  # its --help section; None: the command's plain options
    exclusive: str | None = None  # options of one group naming the same `exclusive` exclude each other

    @property
    def positional(self) -> bool:
        return not self.flag.startswith("-")


def option(flag: str, default: Any = MISSING, **declaration) -> Any:
    """A dataclass field with default `default` (none: a required field), given on the command line as `flag`;
    `declaration` holds the rest of its Option (help, type, choices, nargs, const, metavar, group, exclusive)."""
    return dataclasses.field(default=default, metadata={CLI: Option(flag, **declaration)})


def options_of(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of dataclass `cls` that are command-line options, in field order, with their Option."""
    return [(f, f.metadata[CLI]) for f in dataclasses.fields(cls) if CLI in f.metadata]


def dest(f: dataclasses.Field) -> str:
    """The attribute of the parsed namespace that holds field `f`: a positional argument's name (argparse allows no
    other), else the field's name."""
    opt = f.metadata.get(CLI)
    return opt.flag if opt is not None and opt.positional else f.name


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add the options of dataclass `cls` to `parser`: its sections and mutually exclusive groups are made the first
    time one of their options comes up, so --help lists everything in field order."""
    groups: dict = {}  # Group -> its argument group
    exclusive: dict = {}  # (Group or None, exclusive name) -> its mutually exclusive group
    for f, opt in options_of(cls):
        container = parser
        if opt.group is not None:
            if opt.group not in groups:
                groups[opt.group] = parser.add_argument_group(opt.group.title)
            container = groups[opt.group]
        if opt.exclusive is not None:
            key = (opt.group, opt.exclusive)
            if key not in exclusive:
                exclusive[key] = container.add_mutually_exclusive_group()
            container = exclusive[key]
        container.add_argument(opt.flag, **_add_argument_keywords(f, opt))


def _add_argument_keywords(f: dataclasses.Field, opt: Option) -> dict:
    if isinstance(f.default, bool):  # a switch: given or not
        return {"dest": f.name, "action": "store_false" if f.default else "store_true", "help": opt.help}
    keywords = {"type": opt.type, "choices": opt.choices, "nargs": opt.nargs, "const": opt.const,
                "metavar": opt.metavar, "help": opt.help}
    keywords = {k: v for k, v in keywords.items() if v is not None}
    if not opt.positional:  # argparse takes a positional's dest from its name and refuses a second one
        keywords["dest"] = f.name
    if f.default is not MISSING:
        keywords["default"] = f.default
    return keywords


def from_namespace(cls, namespace: argparse.Namespace):
    """An instance of dataclass `cls` from a parsed command line: every field the namespace holds (its own options,
    and options that other code adds under the field's name, such as --device), the others at their defaults."""
    return cls(**{f.name: getattr(namespace, dest(f)) for f in dataclasses.fields(cls) if hasattr(namespace, dest(f))})
