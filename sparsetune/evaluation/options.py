"""EvalArgs: what `sparsetune eval` measures, typed, each field with its command-line option (`cli_options.py`).

Apart from `command.py` because the command line is built from these fields on every `sparsetune` call (even
`--help`), and this module imports nothing heavy (no torch). Field order is the order of `sparsetune eval --help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsetune.cli_options import Group, option
from sparsetune.cli_types import NON_NEGATIVE, POSITIVE, count, example_limit, open_fraction, targets, task_names
from sparsetune.recipe.schema import ACTIVATIONS, PredictorSection

PROMPT_MASKS = Group(
    "prompt-derived masks (with --dynamic / --sweep): the prompt runs densely, the continuation computes only "
    "the neurons most active over the prompt; perplexity over the continuation tokens")
DOWNSTREAM = Group(
    "downstream tasks (lm-evaluation-harness, `pip install lm-eval`; the model is scored as sparsetune runs it)")


@dataclass
class EvalArgs:
    """What `sparsetune eval` measures (the command line's options, typed)."""

    target: str = option("model", help="export / HF folder, run output_dir or checkpoint, .gguf, alias or hub id")
    data: str | None = option(
        "--data", None, help="held-out text (same forms as data.path); default: the run's or stdlib-docs")
    seq_len: int | None = option("--seq-len", None, type=count(2))
    batches: int = option("--batches", 16, type=POSITIVE)
    batch_size: int = option("--batch-size", 4, type=POSITIVE)
    activation: str | None = option(
        "--activation", None, choices=ACTIVATIONS,
        help="swap the MLP activation before measuring (relu: the untrained ReLU baseline; cats: training-free "
             "thresholds calibrated to --target-sparsity)")
    target_sparsity: float | None = option(
        "--target-sparsity", None, type=open_fraction,
        help="with --activation cats / output_aware: fraction of each layer's neurons to zero (thresholds "
             "calibrated on the training split; default 0.5 / 0.7)")
    no_compensation: bool = option(
        "--no-compensation", False, exclusive="compensation",
        help="measure without the run's dropped-activation compensation biases (what they buy)")
    compensate: bool = option(
        "--compensate", False,
        help="fit dropped-activation compensation biases on --calibration-batches of the training split first "
             "(training-free; replaces any the model has)", exclusive="compensation")
    calibration_batches: int = option(
        "--calibration-batches", 8, type=POSITIVE,
        help="training-split batches used to calibrate thresholds (--activation cats, --target-*recall)")
    near_zero_threshold: float = option("--near-zero-threshold", 1e-3, type=float)
    dynamic: bool = option(
        "--dynamic", False,
        help="also measure perplexity with neurons/heads skipped for real: dense, oracle masks, predicted masks, and "
             "heads skipped with / without their KV-cache writes")
    predictor_threshold: float | None = option(
        "--predictor-threshold", None, type=float,
        help="with --dynamic: keep a neuron/head when sigmoid(logit) >= this (default: the trained "
             "predictor.threshold); lower trades skipped work for recall")
    # Recalibrate the predictors' per-layer thresholds to a recall or to a mass recall, not both.
    target_recall: float | None = option(
        "--target-recall", None, type=float, metavar="R", exclusive="target",
        help="with --dynamic/--generate: recalibrate each layer's predictor threshold to this recall on "
             "--calibration-batches training micro-batches")
    target_mass_recall: float | None = option(
        "--target-mass-recall", None, type=float, metavar="R", exclusive="target",
        help="the same for mass recall (the kept neurons' share of the MLP output's contribution)")
    sweep: tuple[float, ...] | None = option(  # --sweep alone: the targets a run's own sweep uses
        "--sweep", None, type=targets, nargs="?", const=tuple(PredictorSection().sweep_targets),
        metavar="T1,T2,...",
        help="the predictors' curve: per target (default 0.9,0.95,0.98,0.99,0.995) recalibrate, measure skipped "
             "fraction and perplexity, beside the best any predictor could do at the same skipped fraction; "
             "writes JSON-sweep.json and JSON-sweep.png beside --json")
    sweep_kind: str = option("--sweep-kind", "mass_recall", choices=["mass_recall", "recall"])
    prompt_fraction: float = option(
        "--prompt-fraction", 0.5, type=float, metavar="F", group=PROMPT_MASKS,
        help="share of each held-out sequence that is the prompt (default 0.5; 0: no prompt mode)")
    # Prompt masks keep a fraction of the neurons or the fewest carrying a share of the mass, not both.
    prompt_keep: float | None = option(
        "--prompt-keep", None, type=float, metavar="K", group=PROMPT_MASKS, exclusive="keep",
        help="keep this fraction of each layer's neurons, the prompt's most active (default 0.5)")
    prompt_mass: float | None = option(
        "--prompt-mass", None, type=float, metavar="M", group=PROMPT_MASKS, exclusive="keep",
        help="keep the fewest neurons carrying this share of the prompt's activation mass instead")
    generate: int = option(
        "--generate", 0, type=NON_NEGATIVE, metavar="N",
        help="also decode N greedy tokens (batch 1) with dense MLPs and with only the predicted neurons computed, "
             "reporting tokens/s, the MLP time and the perplexity cost (needs predictors)")
    prompt_tokens: int = 32  # the prompt --generate decodes from (not an option)
    tasks: tuple[str, ...] | None = option(
        "--tasks", None, type=task_names, metavar="T1,T2,...", group=DOWNSTREAM,
        help="lm-eval task or group names (arc_easy,hellaswag: their data comes from the hub), glob patterns "
             "(arc_*), .yaml task files, or tasks of --include-path; reports acc / acc_norm with stderr per task")
    include_path: str | None = option(
        "--include-path", None, metavar="DIR", group=DOWNSTREAM,
        help="a folder of your own lm-eval task YAML files (e.g. tests/evaluation/lm_eval_tasks)")
    num_fewshot: int | None = option(
        "--num-fewshot", None, type=NON_NEGATIVE, metavar="N", group=DOWNSTREAM,
        help="few-shot examples per prompt (default: each task's own, usually 0)")
    limit: int | float | None = option(
        "--limit", None, type=example_limit, metavar="N", group=DOWNSTREAM,
        help="only the first N examples of each task (a fraction when < 1): for quick checks, not for reported "
             "results")
    lm_eval_batch_size: int = option(
        "--lm-eval-batch-size", 8, type=POSITIVE, metavar="N", group=DOWNSTREAM,
        help="sequences per forward pass in the harness (default 8)")
    # How the model loads: --device and --trust-remote-code, which export and analyze share (cli._add_load_options).
    device: str = "auto"
    trust_remote_code: bool = False
