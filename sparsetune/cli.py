"""The `sparsetune` command line: train, export, eval, analyze, recipes, validate."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sparsetune.errors import SparsetuneError


def _cmd_train(args) -> int:
    from sparsetune.recipe.loading import load_recipe
    from sparsetune.training.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    if args.resume and args.overwrite:
        raise SparsetuneError("--resume and --overwrite exclude each other")
    if args.launch:
        from sparsetune.launch.launcher import launch

        train_args = [args.recipe, *args.overrides] + (["--overwrite"] if args.overwrite else [])
        if args.resume:
            train_args += ["--resume"] + ([args.resume] if isinstance(args.resume, str) else [])
        return launch(recipe, args.launch, train_args, args.num_processes, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, main_process_ip=args.main_process_ip,
                      main_process_port=args.main_process_port)
    command = " ".join(["sparsetune train", args.recipe, *args.overrides])
    train(recipe, overwrite=args.overwrite, resume=args.resume, command=command)
    return 0


def _cmd_validate(args) -> int:
    from sparsetune.recipe.loading import load_recipe, recipe_to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print:
        print(recipe_to_yaml(recipe), end="")
    print(f"{args.recipe}: ok ({recipe.relufy.activation} + {recipe.regularizer.type}/{recipe.regularizer.schedule}, "
          f"{recipe.train.max_steps} steps, model {recipe.model.path})")
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
                 powerinfer=args.powerinfer)
    print(f"sparsetune: exported to {out}")
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
        print(f"sparsetune: {args.model} is not a run or export sparsetune made, so nothing is written into it; "
              "pass --json FILE to keep the result")
    return None


def _cmd_eval(args) -> int:
    from sparsetune.console import print_eval
    from sparsetune.evaluation.command import EvalArgs, run_eval, write_json

    json_path = _eval_json_path(args)
    result = run_eval(EvalArgs(
        target=args.model, data=args.data, seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size,
        activation=args.activation, near_zero_threshold=args.near_zero_threshold, dynamic=args.dynamic,
        predictor_threshold=args.predictor_threshold, target_recall=args.target_recall,
        target_mass_recall=args.target_mass_recall, target_sparsity=args.target_sparsity,
        sweep=args.sweep, sweep_kind=args.sweep_kind, prompt_fraction=args.prompt_fraction,
        prompt_keep=args.prompt_keep, prompt_mass=args.prompt_mass,
        calibration_batches=args.calibration_batches, generate=args.generate, device=args.device,
        trust_remote_code=args.trust_remote_code, tasks=args.tasks, include_path=args.include_path,
        num_fewshot=args.num_fewshot, limit=args.limit, lm_eval_batch_size=args.lm_eval_batch_size))
    print_eval(result)
    if json_path is not None:
        write_json(result, json_path)
        print(f"sparsetune: wrote {json_path}")
    if result.sweep is not None:
        from sparsetune.evaluation.sweep import write_sweep

        if json_path is None:  # never write into the working directory unasked
            print("sparsetune: the sweep is in the printed result only; pass --json FILE to also get "
                  "FILE-sweep.json and FILE-sweep.png")
        else:
            stem = json_path.with_name(f"{json_path.stem}-sweep")
            for path in write_sweep(result.sweep, stem, f"{args.model}: predictors vs best possible"):
                if path is not None:
                    print(f"sparsetune: wrote {path}")
    return 0


def _count(minimum: int):
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


_POSITIVE, _NON_NEGATIVE = _count(1), _count(0)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one `error:` line (exit 2) like every other error, naming the option."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _targets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated targets in (0, 1], got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"targets must lie in (0, 1], got {text!r}")
    return values


def _task_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated lm-eval task names, e.g. arc_easy,hellaswag")
    return names


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction, got {text!r}") from None
    return int(value) if value >= 1 and value == int(value) else value


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (the GPU when present, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own Python code to run on load; model.trust_remote_code in a checkpoint's "
                        "or export's recipe.yaml is ignored without this flag")


def build_parser() -> argparse.ArgumentParser:
    from sparsetune import __version__
    from sparsetune.launch.presets import PRESETS
    from sparsetune.recipe.schema import ACTIVATIONS, PredictorSection

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
    launch = p.add_argument_group("multi-process launch (runs the same command under `accelerate launch`)")
    launch.add_argument("--launch", metavar="PRESET", choices=list(PRESETS),
                        help=f"{' | '.join(PRESETS)} (sparsetune/launch/presets/)")
    launch.add_argument("--num-processes", type=_POSITIVE, default=None,
                        help="processes per machine (default: the number of GPUs, else 2 on CPU)")
    launch.add_argument("--num-machines", type=_POSITIVE, default=1)
    launch.add_argument("--machine-rank", type=_NON_NEGATIVE, default=0)
    launch.add_argument("--main-process-ip", default=None, help="address of machine rank 0 (multi-node)")
    launch.add_argument("--main-process-port", type=int, default=None)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--print", action="store_true", help="print the resolved recipe with every default")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("export", help="write a run's checkpoint as a plain Hugging Face model folder")
    p.add_argument("run", help="a run's output_dir (its newest complete checkpoint) or one checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--no-eval", action="store_true", help="do not re-measure perplexity/sparsity for the report")
    p.add_argument("--eval-batches", type=_POSITIVE, default=None, help="held-out batches for the report")
    p.add_argument("--powerinfer", action="store_true",
                   help="also write DIR/model.powerinfer.gguf, which PowerInfer runs sparse as it is (a ReLU Llama "
                        "with predictors trained with predictor.output_bias=false and predictor.input=residual), "
                        "and DIR/activation/ (neuron counts for its GPU/CPU split); see docs/ENGINES.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier sparsetune export in --out (a folder sparsetune did not write is refused)")
    _add_load_options(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="perplexity and activation sparsity of a model, run or export")
    p.add_argument("model", help="export / HF folder, run output_dir or checkpoint, .gguf, alias or hub id")
    p.add_argument("--data", help="held-out text (same forms as data.path); default: the run's or stdlib-docs")
    p.add_argument("--seq-len", type=_count(2), default=None)
    p.add_argument("--batches", type=_POSITIVE, default=16)
    p.add_argument("--batch-size", type=_POSITIVE, default=4)
    p.add_argument("--activation", default=None,
                   choices=ACTIVATIONS,
                   help="swap the MLP activation before measuring (relu: the untrained ReLU baseline; cats: "
                        "training-free thresholds calibrated to --target-sparsity)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="with --activation cats: fraction of |SiLU(gate)| to zero per layer (default 0.5)")
    p.add_argument("--calibration-batches", type=_POSITIVE, default=8,
                   help="training-split batches used to calibrate thresholds (--activation cats, --target-*recall)")
    p.add_argument("--near-zero-threshold", type=float, default=1e-3)
    p.add_argument("--dynamic", action="store_true",
                   help="also measure perplexity with neurons/heads skipped for real: dense, oracle masks, predicted "
                        "masks, and heads skipped with / without their KV-cache writes")
    p.add_argument("--predictor-threshold", type=float, default=None,
                   help="with --dynamic: keep a neuron/head when sigmoid(logit) >= this (default: the trained "
                        "predictor.threshold); lower trades skipped work for recall")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-recall", type=float, default=None, metavar="R",
                        help="with --dynamic/--generate: recalibrate each layer's predictor threshold to this "
                             "recall on --calibration-batches training micro-batches")
    target.add_argument("--target-mass-recall", type=float, default=None, metavar="R",
                        help="the same for mass recall (the kept neurons' share of the MLP output's contribution)")
    p.add_argument("--sweep", type=_targets, nargs="?", const=tuple(PredictorSection().sweep_targets), default=None,
                   metavar="T1,T2,...",
                   help="the predictors' curve: per target (default 0.9,0.95,0.98,0.99,0.995) recalibrate, measure "
                        "skipped fraction and perplexity, beside the best any predictor could do at the same skipped "
                        "fraction; writes JSON-sweep.json and JSON-sweep.png beside --json")
    p.add_argument("--sweep-kind", choices=["mass_recall", "recall"], default="mass_recall")
    prompt = p.add_argument_group(
        "prompt-derived masks (with --dynamic / --sweep): the prompt runs densely, the continuation computes only "
        "the neurons most active over the prompt; perplexity over the continuation tokens")
    prompt.add_argument("--prompt-fraction", type=float, default=0.5, metavar="F",
                        help="share of each held-out sequence that is the prompt (default 0.5; 0: no prompt mode)")
    keep = prompt.add_mutually_exclusive_group()
    keep.add_argument("--prompt-keep", type=float, default=None, metavar="K",
                      help="keep this fraction of each layer's neurons, the prompt's most active (default 0.5)")
    keep.add_argument("--prompt-mass", type=float, default=None, metavar="M",
                      help="keep the fewest neurons carrying this share of the prompt's activation mass instead")
    p.add_argument("--generate", type=_NON_NEGATIVE, default=0, metavar="N",
                   help="also decode N greedy tokens (batch 1) with dense MLPs and with only the predicted neurons "
                        "computed, reporting tokens/s, the MLP time and the perplexity cost (needs predictors)")
    harness = p.add_argument_group(
        "downstream tasks (lm-evaluation-harness, `pip install lm-eval`; the model is scored as sparsetune runs it)")
    harness.add_argument("--tasks", type=_task_names, default=None, metavar="T1,T2,...",
                         help="lm-eval task or group names (arc_easy,hellaswag: their data comes from the hub), glob "
                              "patterns (arc_*), .yaml task files, or tasks of --include-path; reports acc / acc_norm "
                              "with stderr per task")
    harness.add_argument("--include-path", default=None, metavar="DIR",
                         help="a folder of your own lm-eval task YAML files (e.g. tests/evaluation/lm_eval_tasks)")
    harness.add_argument("--num-fewshot", type=_NON_NEGATIVE, default=None, metavar="N",
                         help="few-shot examples per prompt (default: each task's own, usually 0)")
    harness.add_argument("--limit", type=_limit, default=None, metavar="N",
                         help="only the first N examples of each task (a fraction when < 1): for quick checks, "
                              "not for reported results")
    harness.add_argument("--lm-eval-batch-size", type=_POSITIVE, default=8, metavar="N",
                         help="sequences per forward pass in the harness (default 8)")
    p.add_argument("--json", default=None, help="write the result here (default: MODEL/eval.json for folders)")
    _add_load_options(p)
    p.set_defaults(func=_cmd_eval)
    _add_analyze_parser(sub)
    return parser


def _cmd_analyze(args) -> int:
    from sparsetune.analysis.command import AnalyzeArgs, run_analysis
    from sparsetune.analysis.report import summary

    result, files = run_analysis(AnalyzeArgs(
        target=args.model, data=args.data, out=args.out, seq_len=args.seq_len, batches=args.batches,
        batch_size=args.batch_size, activation=args.activation, prompt_fraction=args.prompt_fraction,
        cett_tokens=args.cett_tokens, wandb=args.wandb, wandb_project=args.wandb_project, device=args.device,
        trust_remote_code=args.trust_remote_code))
    print(f"sparsetune: {summary(result)}")
    print(f"sparsetune: wrote {files[1]} (with {files[0].name} and {len(files) - 2} figures)")
    return 0


def _add_analyze_parser(sub) -> None:
    from sparsetune.recipe.schema import ACTIVATIONS

    p = sub.add_parser("analyze", help="activation structure of a model: sparsity and CETT, inertia, history "
                                       "dependence, prompt-to-continuation overlap, head activity (report + figures)")
    p.add_argument("model", help="export / HF folder, run output_dir or checkpoint, .gguf, alias or hub id")
    p.add_argument("--data", help="held-out text (same forms as data.path); default: the run's or stdlib-docs")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="report folder: analysis.md, analysis.json, PNG figures (default: MODEL/analysis for a "
                        "folder; required otherwise)")
    p.add_argument("--seq-len", type=_count(2), default=None, help="tokens per sequence (default: the data's, 256)")
    p.add_argument("--batches", type=_POSITIVE, default=4)
    p.add_argument("--batch-size", type=_POSITIVE, default=2,
                   help="sequences per batch (batches x batch size sequences are analyzed; default 4 x 2)")
    p.add_argument("--activation", default=None, choices=[a for a in ACTIVATIONS if a != "cats"],
                   help="swap the MLP activation first (relu: the untrained ReLU swap)")
    p.add_argument("--prompt-fraction", type=float, default=0.5, metavar="F",
                   help="share of each sequence that is the prompt for the prompt-to-continuation overlap")
    p.add_argument("--cett-tokens", type=_POSITIVE, default=256, metavar="N",
                   help="tokens per layer the CETT thresholds are fitted on (default 256)")
    p.add_argument("--wandb", nargs="?", const="auto", default=None, choices=["auto", "online", "offline"],
                   help="also log the report to W&B in DIR/wandb (auto: online with an API key, else offline)")
    p.add_argument("--wandb-project", default="sparsetune")
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
        print("sparsetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
