"""The `sparsetune` command line: train, export, eval, recipes, validate."""

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


def _cmd_eval(args) -> int:
    from sparsetune.console import print_eval
    from sparsetune.evaluation.command import EvalArgs, run_eval, write_json

    result = run_eval(EvalArgs(
        target=args.model, data=args.data, seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size,
        activation=args.activation, near_zero_threshold=args.near_zero_threshold, dynamic=args.dynamic,
        predictor_threshold=args.predictor_threshold, target_recall=args.target_recall,
        target_mass_recall=args.target_mass_recall, target_sparsity=args.target_sparsity,
        sweep=args.sweep, sweep_kind=args.sweep_kind,
        calibration_batches=args.calibration_batches, generate=args.generate, device=args.device,
        trust_remote_code=args.trust_remote_code))
    print_eval(result)
    json_path = Path(args.json) if args.json else None
    if json_path is None and Path(args.model).is_dir():
        json_path = Path(args.model) / "eval.json"
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


def _targets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated targets in (0, 1], got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"targets must lie in (0, 1], got {text!r}")
    return values


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (the GPU when present, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own Python code to run on load; model.trust_remote_code in a checkpoint's "
                        "or export's recipe.yaml is ignored without this flag")


def build_parser() -> argparse.ArgumentParser:
    from sparsetune import __version__
    from sparsetune.launch.presets import PRESETS
    from sparsetune.recipe.schema import ACTIVATIONS, PredictorSection

    parser = argparse.ArgumentParser(prog="sparsetune", description="Sparsity-aware fine-tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"sparsetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    launch.add_argument("--num-processes", type=int, default=None,
                        help="processes per machine (default: the number of GPUs, else 2 on CPU)")
    launch.add_argument("--num-machines", type=int, default=1)
    launch.add_argument("--machine-rank", type=int, default=0)
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
    p.add_argument("--eval-batches", type=int, default=None, help="held-out batches for the report")
    p.add_argument("--powerinfer", action="store_true",
                   help="also write the neuron predictors in PowerInfer's layout (powerinfer_predictors/: "
                        "model_N.pt with fc1/fc2 + config.json with sparse_threshold) for its "
                        "convert-hf-to-powerinfer-gguf.py; needs predictors trained with predictor.output_bias=false")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier sparsetune export in --out (a folder sparsetune did not write is refused)")
    _add_load_options(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="perplexity and activation sparsity of a model, run or export")
    p.add_argument("model", help="export / HF folder, run output_dir or checkpoint, .gguf, alias or hub id")
    p.add_argument("--data", help="held-out text (same forms as data.path); default: the run's or stdlib-docs")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--activation", default=None,
                   choices=ACTIVATIONS,
                   help="swap the MLP activation before measuring (relu: the untrained ReLU baseline; cats: "
                        "training-free thresholds calibrated to --target-sparsity)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="with --activation cats: fraction of |SiLU(gate)| to zero per layer (default 0.5)")
    p.add_argument("--calibration-batches", type=int, default=8,
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
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also decode N greedy tokens (batch 1) with dense MLPs and with only the predicted neurons "
                        "computed, reporting tokens/s, the MLP time and the perplexity cost (needs predictors)")
    p.add_argument("--json", default=None, help="write the result here (default: MODEL/eval.json for folders)")
    _add_load_options(p)
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.command in ("train", "export", "eval"):
        import torch

        if not torch.cuda.is_available():  # DeepSpeed would warn that it falls back to its CPU accelerator
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        return args.func(args)
    except SparsetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sparsetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
