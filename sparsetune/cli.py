"""The `sparsetune` command line: train, export, eval, analyze, recipes, validate."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from sparsetune.cli_options import add_options, from_namespace
from sparsetune.cli_types import NON_NEGATIVE, POSITIVE, POSITIVE_NUMBER
from sparsetune.console import notice
from sparsetune.errors import SparsetuneError


def _cmd_train(args) -> int:
    from sparsetune.recipe.loading import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.resume and args.overwrite:
        raise SparsetuneError("--resume and --overwrite exclude each other")
    if args.launch:
        from sparsetune.launch.launcher import launch

        train_args = [args.recipe, *args.overrides] + (["--overwrite"] if args.overwrite else [])
        train_args += ["--allow-data-change"] if args.allow_data_change else []
        if args.resume:
            train_args += ["--resume"] + ([args.resume] if isinstance(args.resume, str) else [])
        return launch(recipe, args.launch, train_args, args.num_processes, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, main_process_ip=args.main_process_ip,
                      main_process_port=args.main_process_port)
    command = shlex.join(["sparsetune", "train", args.recipe, *args.overrides])  # pasted back into a shell as is
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from sparsetune.training.trainer import train  # not in the launcher above: ~5 s of imports it never uses

        train(recipe, overwrite=args.overwrite, resume=args.resume, command=command,
              allow_data_change=args.allow_data_change)
        return 0
    # A launched worker: the process group's teardown runs under a watchdog and the worker then leaves at once
    from sparsetune.training import teardown
    from sparsetune.training.trainer import Trainer

    trainer = Trainer(recipe, overwrite=args.overwrite, resume=args.resume, command=command,
                      allow_data_change=args.allow_data_change)
    rank = int(os.environ.get("RANK", "0"))
    try:
        trainer.run()
    except SparsetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        teardown.close_and_leave(trainer.close, exc.exit_code, rank=rank)
    except BaseException as exc:  # the one-line message or traceback still prints; the exit is bounded
        teardown.arm(130 if isinstance(exc, KeyboardInterrupt) else 1, rank=rank)
        trainer.close()
        raise
    teardown.close_and_leave(trainer.close, 0, rank=rank)
    return 0  # not reached


def _cmd_validate(args) -> int:
    from sparsetune.recipe.loading import load_recipe, recipe_to_yaml

    if args.launch is None:
        for option in ("num_processes", "device_memory", "model_config"):
            if getattr(args, option) is not None:
                raise SparsetuneError(f"--{option.replace('_', '-')} plans a launch: give --launch PRESET too")
    else:
        from sparsetune.launch.presets import get_preset

        preset = get_preset(args.launch)
        if args.num_processes is None:
            raise SparsetuneError(f"--launch {args.launch}: give --num-processes N (processes per machine) to plan it")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print:
        print(recipe_to_yaml(recipe), end="")
    print(f"{args.recipe}: ok ({recipe.relufy.activation} + {recipe.regularizer.type}/{recipe.regularizer.schedule}, "
          f"{recipe.train.max_steps} steps, model {recipe.model.path})")
    if args.launch is None:
        return 0
    # the memory plan of the launch (launch/plan.py): the model's config only, no weights
    from sparsetune.launch.compatibility import check_launch
    from sparsetune.launch.plan import format_plan, plan_for_recipe

    check_launch(recipe, preset.strategy, preset.shards_parameters, args.num_processes * args.num_machines,
                 f"--launch {args.launch}")
    plan = plan_for_recipe(recipe, preset, args.num_processes, args.model_config, machines=args.num_machines)
    print(format_plan(plan, args.device_memory, label=args.recipe))
    return 0


def _cmd_recipes(args) -> int:
    from sparsetune.recipe.loading import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        try:
            desc = load_recipe(str(path)).description or "(no description)"
        except SparsetuneError as exc:
            desc = f"INVALID: {exc}"
        print(f"{name:<22} {desc}")
    return 0


def _cmd_export(args) -> int:
    from sparsetune.export.exporter import export

    out = export(args.run, args.out, measure=not args.no_eval, eval_batches_n=args.eval_batches,
                 overwrite=args.overwrite, device=args.device, trust_remote_code=args.trust_remote_code,
                 target=args.target)
    notice(f"exported to {out}")
    return 0


def _eval_json_path(args) -> Path | None:
    """Where eval writes its JSON: --json (checked before anything is computed), else MODEL/eval.json only when
    MODEL is a run or an export sparsetune made; never into a folder of the user's."""
    from sparsetune.checkpoint.folders import check_output_file, made_by_sparsetune

    if args.json:
        return check_output_file(Path(args.json), "--json")
    if made_by_sparsetune(Path(args.model)):
        return check_output_file(Path(args.model) / "eval.json", "eval result")
    if Path(args.model).is_dir():
        notice(f"{args.model} is not a run or export sparsetune made, so nothing is written into it; pass --json "
               "FILE to keep the result")
    return None


def _cmd_eval(args) -> int:
    from sparsetune.evaluation.command import run_eval, write_json
    from sparsetune.evaluation.options import EvalArgs
    from sparsetune.evaluation.tables import print_eval
    from sparsetune.training.completion import refuse_unfinished_source

    json_path = _eval_json_path(args)
    eval_args = from_namespace(EvalArgs, args)
    if eval_args.activation is None:  # a swapped activation is the user's own, training-free model
        refuse_unfinished_source(eval_args.target, "eval")
    result = run_eval(eval_args)
    print_eval(result)
    if json_path is not None:
        write_json(result, json_path)
        notice(f"wrote {json_path}")
    if result.sweep is not None:
        from sparsetune.evaluation.sweep import write_sweep

        if json_path is None:  # never write into the working directory unasked
            notice("the sweep is in the printed result only; pass --json FILE to also get FILE-sweep.json and "
                   "FILE-sweep.png")
        else:
            stem = json_path.with_name(f"{json_path.stem}-sweep")
            for path in write_sweep(result.sweep, stem, f"{args.model}: predictors vs best possible"):
                if path is not None:
                    notice(f"wrote {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one `error:` line (exit 2) like every other error, naming the option."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (the GPU when present, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own Python code to run on load; model.trust_remote_code in a checkpoint's "
                        "or export's recipe.yaml is ignored without this flag")


def build_parser() -> argparse.ArgumentParser:
    from sparsetune import __version__
    from sparsetune.evaluation.options import EvalArgs
    from sparsetune.launch.presets import PRESETS

    parser = _Parser(prog="sparsetune", description="Sparsity-aware fine-tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"sparsetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="run a recipe: sparsetune train RECIPE.yaml [KEY=VALUE ...]")
    p.add_argument("recipe", help="recipe file, or the name of a built-in recipe (see `sparsetune recipes`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=20")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a sparsetune run already in output_dir (only what the run wrote is removed; a folder "
                        "sparsetune did not create is refused)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run in output_dir from its newest usable checkpoint (a new run when output_dir "
                        "is new or empty), or from the given checkpoint folder; never deletes anything")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue on the data as it is now when its rows differ from those the run "
                        "started on (a data file edited in place); without it such a resume stops with one line")
    launch = p.add_argument_group("multi-process launch (runs the same command under `accelerate launch`)")
    launch.add_argument("--launch", metavar="PRESET", choices=list(PRESETS),
                        help=f"{' | '.join(PRESETS)} (sparsetune/launch/presets/)")
    launch.add_argument("--num-processes", type=POSITIVE, default=None,
                        help="processes per machine (default: the number of GPUs, else 2 on CPU)")
    launch.add_argument("--num-machines", type=POSITIVE, default=1)
    launch.add_argument("--machine-rank", type=NON_NEGATIVE, default=0)
    launch.add_argument("--main-process-ip", default=None, help="address of machine rank 0 (multi-node)")
    launch.add_argument("--main-process-port", type=int, default=None)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--print", action="store_true", help="print the resolved recipe with every default")
    plan = p.add_argument_group("memory plan of a launch (from the model's config only, no weights; for GPUs: "
                                "train.mixed_precision auto is bf16)")
    plan.add_argument("--launch", metavar="PRESET", default=None, help=f"{' | '.join(PRESETS)}")
    plan.add_argument("--num-processes", type=POSITIVE, default=None, help="processes per machine")
    plan.add_argument("--num-machines", type=POSITIVE, default=1)
    plan.add_argument("--device-memory", type=POSITIVE_NUMBER, default=None, metavar="GiB",
                      help="memory of one device: the plan says whether its total fits")
    plan.add_argument("--model-config", default=None, metavar="PATH",
                      help="a config.json (or its folder) to plan from instead of model.path's (a hub id offline)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("export", help="write a run's checkpoint as a plain Hugging Face model folder")
    p.add_argument("run", help="a run's output_dir (its newest complete checkpoint) or one checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--no-eval", action="store_true", help="do not re-measure perplexity/sparsity for the report")
    p.add_argument("--eval-batches", type=POSITIVE, default=None, help="held-out batches for the report")
    p.add_argument("--target", default=None, metavar="NAME",
                   help="export target (sparsetune/export/targets/): hf = a plain Hugging Face folder, hf_code = one "
                        "with its own modeling code (trust_remote_code), powerinfer = also DIR/model.powerinfer.gguf, "
                        "which PowerInfer runs sparse as it is, and DIR/activation/ (see docs/ENGINES.md); default: "
                        "hf when plain transformers computes the trained model exactly, else hf_code")
    p.add_argument("--powerinfer", dest="target", action="store_const", const="powerinfer",
                   help="the same as --target powerinfer")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier sparsetune export in --out (a folder sparsetune did not write is refused)")
    _add_load_options(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="perplexity and activation sparsity of a model, run or export")
    add_options(p, EvalArgs)  # its options are declared on EvalArgs's fields (evaluation/options.py)
    # Where the result is written is the command line's business (_eval_json_path), not a measurement option.
    p.add_argument("--json", default=None,
                   help="write the result here (default: MODEL/eval.json when MODEL is a run or export sparsetune "
                        "made; nothing is written otherwise)")
    _add_load_options(p)
    p.set_defaults(func=_cmd_eval)
    _add_analyze_parser(sub)
    return parser


def _cmd_analyze(args) -> int:
    from sparsetune.analysis.command import run_analysis
    from sparsetune.analysis.options import AnalyzeArgs
    from sparsetune.analysis.report import summary
    from sparsetune.training.completion import refuse_unfinished_source

    analyze_args = from_namespace(AnalyzeArgs, args)
    if not analyze_args.activation:
        refuse_unfinished_source(analyze_args.target, "analyze")
    result, files = run_analysis(analyze_args)
    notice(summary(result))
    notice(f"wrote {files[1]} (with {files[0].name} and {len(files) - 2} figures)")
    return 0


def _add_analyze_parser(sub) -> None:
    from sparsetune.analysis.options import AnalyzeArgs

    p = sub.add_parser("analyze", help="activation structure of a model: sparsity and CETT, inertia, history "
                                       "dependence, prompt-to-continuation overlap, head activity (report + figures)")
    add_options(p, AnalyzeArgs)  # its options are declared on AnalyzeArgs's fields (analysis/options.py)
    _add_load_options(p)
    p.set_defaults(func=_cmd_analyze)


def _check_target_names(args) -> None:
    """The model / run argument of eval, analyze and export: a NUL byte or an over-long name is one line."""
    from sparsetune.checkpoint.folders import check_name

    for name in ("model", "run"):
        if isinstance(getattr(args, name, None), str):
            check_name(Path(getattr(args, name)), {"model": "MODEL", "run": "RUN"}[name])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.command in ("train", "export", "eval", "analyze"):
        import torch

        if not torch.cuda.is_available():  # DeepSpeed would warn that it falls back to its CPU accelerator
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        _check_target_names(args)
        return args.func(args)
    except SparsetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        # A full, read-only or unwritable disk met where no caller expected it (a metrics line, a W&B file, a
        # report): one line, whatever library raised it. Anything else is a bug and keeps its traceback.
        from sparsetune.checkpoint.storage import storage_failure

        storage = storage_failure(exc)
        if storage is None:
            raise
        print(f"error: a file could not be written: {storage}; free space or choose a writable place, then run the "
              "command again (a run continues with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        notice("interrupted", err=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
