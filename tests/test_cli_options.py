"""eval's and analyze's options are declared once, on the fields of EvalArgs / AnalyzeArgs: the parser is built from
them, and the parsed command line turns back into them with nothing copied by hand."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass

import pytest

from sparsetune import cli
from sparsetune.analysis.options import AnalyzeArgs
from sparsetune.cli_options import CLI, add_options, dest, from_namespace, option, options_of
from sparsetune.cli_types import POSITIVE
from sparsetune.evaluation.options import DOWNSTREAM, PROMPT_MASKS, EvalArgs
from sparsetune.recipe.schema import PredictorSection


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


class _Stop(Exception):
    """Raised by the stand-in for run_eval / run_analysis once it has the typed arguments."""


def _typed_args(monkeypatch, argv: list[str]):
    """The EvalArgs / AnalyzeArgs that `sparsetune ARGV` hands to run_eval / run_analysis (nothing is measured)."""
    got = []

    def capture(args):
        got.append(args)
        raise _Stop

    monkeypatch.setattr("sparsetune.evaluation.command.run_eval", capture)
    monkeypatch.setattr("sparsetune.analysis.command.run_analysis", capture)
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(_Stop):
        args.func(args)
    return got[0]


def _at_defaults_except(typed, given: dict) -> None:
    """Every field of `typed` not in `given` holds its dataclass default."""
    for f in dataclasses.fields(typed):
        if f.name not in given and f.default is not MISSING:
            assert getattr(typed, f.name) == f.default, f.name


@pytest.mark.parametrize("cls, command", [(EvalArgs, "eval"), (AnalyzeArgs, "analyze")])
def test_every_declared_field_is_an_option_with_the_fields_default(cls, command):
    parser = _subparser(command)
    actions, help_text = _actions_by_dest(parser), parser.format_help()
    declared = options_of(cls)
    assert declared, "the dataclass declares its options"
    for f, opt in declared:
        action = actions[dest(f)]
        assert (action.option_strings == [opt.flag]) if not opt.positional else (action.option_strings == [])
        assert opt.flag in help_text
        if f.default is MISSING:
            assert action.required, f.name
        else:
            assert action.default == f.default, f.name
    # Fields set by the options shared with export (--device, --trust-remote-code) default alike on both sides.
    for f in dataclasses.fields(cls):
        if CLI not in f.metadata and f.name in actions:
            assert actions[f.name].default == f.default, f.name


def test_fields_without_an_option_stay_off_the_command_line():
    eval_actions, analyze_actions = _actions_by_dest(_subparser("eval")), _actions_by_dest(_subparser("analyze"))
    assert "prompt_tokens" not in eval_actions
    assert "seed" not in analyze_actions and "near_zero_threshold" not in analyze_actions
    assert "--json" in _subparser("eval").format_help() and "json" not in {f.name for f in dataclasses.fields(EvalArgs)}


def test_eval_help_keeps_its_sections_and_exclusive_groups():
    parser = _subparser("eval")
    titles = [g.title for g in parser._action_groups]
    assert PROMPT_MASKS.title in titles and DOWNSTREAM.title in titles
    exclusive = [{a.dest for a in g._group_actions} for g in parser._mutually_exclusive_groups]
    assert {"target_recall", "target_mass_recall"} in exclusive and {"prompt_keep", "prompt_mass"} in exclusive
    prompt = next(g for g in parser._action_groups if g.title == PROMPT_MASKS.title)
    assert {a.dest for a in prompt._group_actions} == {"prompt_fraction", "prompt_keep", "prompt_mass"}
    for both in (["--target-recall", "0.9", "--target-mass-recall", "0.9"],
                 ["--prompt-keep", "0.4", "--prompt-mass", "0.8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["m", *both])


def test_an_eval_command_line_gives_the_eval_args_it_names(monkeypatch):
    argv = ["eval", "some/model", "--batches", "3", "--target-mass-recall", "0.9", "--prompt-keep", "0.4",
            "--tasks", "a,b", "--limit", "0.5", "--device", "cpu", "--trust-remote-code", "--dynamic"]
    given = dict(target="some/model", batches=3, target_mass_recall=0.9, prompt_keep=0.4, tasks=("a", "b"), limit=0.5,
                 device="cpu", trust_remote_code=True, dynamic=True)
    typed = _typed_args(monkeypatch, argv)
    assert typed == EvalArgs(**given)
    _at_defaults_except(typed, given)
    assert typed.prompt_tokens == 32  # not an option: its default


def test_eval_sweep_alone_takes_the_recipes_sweep_targets(monkeypatch):
    assert _typed_args(monkeypatch, ["eval", "m", "--sweep"]).sweep == tuple(PredictorSection().sweep_targets)
    typed = _typed_args(monkeypatch, ["eval", "m", "--sweep", "0.5,0.8", "--limit", "10", "--seq-len", "8"])
    assert (typed.sweep, typed.limit, typed.seq_len) == ((0.5, 0.8), 10, 8)
    assert _typed_args(monkeypatch, ["eval", "m"]) == EvalArgs(target="m")


def test_an_analyze_command_line_gives_the_analyze_args_it_names(monkeypatch):
    argv = ["analyze", "some/model", "--out", "report", "--batches", "2", "--activation", "relu",
            "--cett-tokens", "64", "--wandb", "--device", "cpu"]
    given = dict(target="some/model", out="report", batches=2, activation="relu", cett_tokens=64, wandb="auto",
                 device="cpu")
    typed = _typed_args(monkeypatch, argv)
    assert typed == AnalyzeArgs(**given)
    _at_defaults_except(typed, given)
    assert _typed_args(monkeypatch, ["analyze", "m", "--wandb", "offline"]).wandb == "offline"
    with pytest.raises(SystemExit):  # analyze calibrates nothing: no cats
        cli.build_parser().parse_args(["analyze", "m", "--activation", "cats"])


@dataclass
class _EvalWithTopK(EvalArgs):
    top_k: int | None = option("--top-k", None, type=POSITIVE, metavar="K", group=DOWNSTREAM,
                               help="a new option, declared only here")


def test_a_new_field_is_a_new_option_without_touching_cli(monkeypatch):
    parser = argparse.ArgumentParser()
    add_options(parser, _EvalWithTopK)
    assert from_namespace(_EvalWithTopK, parser.parse_args(["m", "--top-k", "5"])) == _EvalWithTopK("m", top_k=5)

    # The real command line, with eval's typed arguments swapped for the subclass: the flag is there and arrives.
    monkeypatch.setattr("sparsetune.evaluation.options.EvalArgs", _EvalWithTopK)
    harness = next(g for g in _subparser("eval")._action_groups if g.title == DOWNSTREAM.title)
    assert "top_k" in {a.dest for a in harness._group_actions}
    typed = _typed_args(monkeypatch, ["eval", "m", "--top-k", "7", "--batches", "2"])
    assert typed == _EvalWithTopK(target="m", top_k=7, batches=2)
