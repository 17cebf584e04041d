"""AnalyzeArgs: what `sparsetune analyze` measures, typed, each field with its command-line option
(`cli_options.py`). Apart from `command.py`, which imports torch, because the command line is built from these fields
on every `sparsetune` call. Field order is the order of `sparsetune analyze --help`."""

from __future__ import annotations

from dataclasses import dataclass

from sparsetune.activations import activation_class
from sparsetune.cli_options import option
from sparsetune.cli_types import POSITIVE, count
from sparsetune.recipe.schema import ACTIVATIONS


@dataclass
class AnalyzeArgs:
    """What `sparsetune analyze` measures (the command line's options, typed)."""

    target: str = option("model", help="export / HF folder, run output_dir or checkpoint, .gguf, alias or hub id")
    data: str | None = option(  # default: the held-out text eval uses (the run's / export's, else stdlib-docs)
        "--data", None, help="held-out text (same forms as data.path); default: the run's or stdlib-docs")
    out: str | None = option(
        "--out", None, metavar="DIR",
        help="report folder: analysis.md, analysis.json, PNG figures (default: MODEL/analysis when MODEL is a "
             "run or export sparsetune made; required otherwise)")
    seq_len: int | None = option(
        "--seq-len", None, type=count(2), help="tokens per sequence (default: the data's, 256)")
    batches: int = option("--batches", 4, type=POSITIVE)
    batch_size: int = option(
        "--batch-size", 2, type=POSITIVE,
        help="sequences per batch (batches x batch size sequences are analyzed; default 4 x 2)")
    activation: str | None = option(  # those fitted on data (cats) are left out: analyze calibrates nothing
        "--activation", None, choices=[a for a in ACTIVATIONS if not activation_class(a).needs_data],
        help="swap the MLP activation first (relu: the untrained ReLU swap)")
    prompt_fraction: float = option(
        "--prompt-fraction", 0.5, type=float, metavar="F",
        help="share of each sequence that is the prompt for the prompt-to-continuation overlap")
    cett_tokens: int = option(
        "--cett-tokens", 256, type=POSITIVE, metavar="N",
        help="tokens per layer the CETT thresholds are fitted on (default 256)")
    wandb: str | None = option(  # None: no W&B
        "--wandb", None, nargs="?", const="auto", choices=["auto", "online", "offline"],
        help="also log the report to W&B in DIR/wandb (auto: online with an API key, else offline)")
    wandb_project: str = option("--wandb-project", "sparsetune")
    near_zero_threshold: float = 1e-3  # not an option: eval's default
    seed: int = 0  # of the token pairs sampled for inertia and history (not an option)
    # How the model loads: --device and --trust-remote-code, which export and eval share (cli._add_load_options).
    device: str = "auto"
    trust_remote_code: bool = False
