"""argparse types of the command line's options: each parses one value or names what is wrong with it (argparse turns
the ArgumentTypeError into the one `error:` line of a usage mistake). Kept apart from cli.py so that the typed
arguments of a command (`evaluation/options.py`, `analysis/options.py`) can declare their options without importing
the command line."""

from __future__ import annotations

import argparse


def count(minimum: int):
    """An argparse type: an integer >= `minimum` (a count of batches, tokens, sequences...)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "count"
    return parse


POSITIVE, NON_NEGATIVE = count(1), count(0)


def POSITIVE_NUMBER(text: str) -> float:  # noqa: N802 (named like the other argparse types)
    """A finite number > 0 (a memory size in GiB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def open_fraction(text: str) -> float:
    """A fraction strictly between 0 and 1 (a share of neurons to zero: 0 zeroes nothing, 1 everything)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def targets(text: str) -> tuple[float, ...]:
    """Comma-separated recall targets in (0, 1]: 0.9,0.95,0.99."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated targets in (0, 1], got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"targets must lie in (0, 1], got {text!r}")
    return values


def task_names(text: str) -> tuple[str, ...]:
    """Comma-separated lm-eval task names (blanks dropped; at least one)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated lm-eval task names, e.g. arc_easy,hellaswag")
    return names


def example_limit(text: str) -> int | float:
    """lm-eval's --limit: a whole number of examples (an int) or a fraction (a float)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction, got {text!r}") from None
    return int(value) if value >= 1 and value == int(value) else value
