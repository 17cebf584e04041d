#!/usr/bin/env python
"""The sparsity/quality frontier on SmolLM2-135M: training-free baselines vs trained variants.

    python scripts/bench_tradeoff.py                       # everything, ~1 h on 2 CPU cores
    python scripts/bench_tradeoff.py --steps 40 --only relu_l1,cats70 --out runs/bench_small
    python scripts/bench_tradeoff.py --tasks arc_easy,hellaswag --limit 500   # + accuracy columns (needs internet)
    python scripts/bench_tradeoff.py --tasks sparsetune_tiny_mc --include-path tests/evaluation/lm_eval_tasks

Every trained variant starts from the embedded SmolLM2-135M-Instruct and gets the same token budget
(--steps x micro-batch 2 x 256 tokens, lr 3e-4, 10 warmup steps, cosine), trained by `sparsetune train`
in its own process. Runs already finished in --out are reused, so an interrupted benchmark continues.
Each model is measured on two held-out texts:

  code-docs   the stdlib-docs eval split (modules never trained on; the training domain)
  legal       the licence texts in /usr/share/common-licenses (GPL, Apache, MPL, ...: another domain)

With --tasks, each model (as sparsetune runs it: CATS thresholds, top-k, dReLU included) is also scored by
lm-evaluation-harness, one accuracy column per task; a rerun reuses the scores a model already has (with the same
--tasks settings, or any when --tasks is left out).

Writes docs/tradeoff.md (table), docs/tradeoff.json (all numbers) and docs/tradeoff.png (the frontier).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LICENSES = Path("/usr/share/common-licenses")
DEFAULT_STEPS = 160  # 81,920 tokens per trained variant

# Progressive L1 (ProSparse-style sine stages): recover first, then push.
PROSPARSE = ("regularizer.type=l1", "regularizer.schedule=prosparse",
             "regularizer.stages=[{end_fraction: 0.1, coef: 0.0}, {end_fraction: 0.4, coef: 20.0}, "
             "{end_fraction: 0.7, coef: 50.0}, {end_fraction: 1.0, coef: 80.0}]")

# Predictors PowerInfer runs as they are (recipes/powerinfer.yaml): residual input, bias-free fc1 -> ReLU -> fc2
POWERINFER_PREDICTORS = ("predictor.enabled=true", "predictor.input=residual", "predictor.output_bias=false",
                         "predictor.nonlinearity=relu", "predictor.rank=112", "predictor.lr=0.01",
                         "predictor.train_token_fraction=1.0", "predictor.mask_aware_fraction=0.4",
                         "predictor.target_mass_recall=0.985", "predictor.only_steps=120",
                         "predictor.dynamic_eval_batches=4")

# name -> (label, how): how = ("eval", activation, target_sparsity[, compensate]) or ("train", overrides)
VARIANTS = {
    "dense": ("dense SiLU, as shipped", ("eval", None, None)),
    "relu_swap": ("ReLU swap, untrained", ("eval", "relu", None)),
    "cats50": ("CATS 50% (training-free)", ("eval", "cats", 0.5)),
    "cats70": ("CATS 70% (training-free)", ("eval", "cats", 0.7)),
    "cats90": ("CATS 90% (training-free)", ("eval", "cats", 0.9)),
    "dense_ft": ("dense SiLU, fine-tuned", ("train", ["relufy.activation=silu", "regularizer.type=none"])),
    "relu_l1": ("ReLU + progressive L1", ("train", ["relufy.activation=relu", *PROSPARSE])),
    "relu_l1_distill": ("ReLU + progressive L1 + distillation",
                        ("train", ["relufy.activation=relu", *PROSPARSE, "distill.weight=1.0"])),
    "drelu_l1": ("dReLU + progressive L1", ("train", ["relufy.activation=drelu", *PROSPARSE])),
    "topk10": ("top-k 10% (straight-through)", ("train", ["relufy.activation=topk", "relufy.top_k_fraction=0.1",
                                                          "regularizer.type=none"])),
    # issue 13: a dense per-layer signal (layer-wise MLP distillation) and conversions to exact zeros without a sort
    "relu_l1_mlp_shift": ("ReLU + progressive L1 + MLP distillation + FATReLU shift (CETT 0.1)",
                          ("train", ["relufy.activation=relu", *PROSPARSE, "distill.mlp_weight=1.0",
                                     "thresholds.cett=0.1", "thresholds.at_fraction=1.0"])),
    "relu_l1_distill_shift": ("ReLU + progressive L1 + distillation + FATReLU shift (CETT 0.1)",
                              ("train", ["relufy.activation=relu", *PROSPARSE, "distill.weight=1.0",
                                         "thresholds.cett=0.1", "thresholds.at_fraction=1.0"])),
    "topk10_mlp_cats": ("top-k 10% + MLP distillation -> CATS 88% at half-way + recovery",
                        ("train", ["relufy.activation=topk", "relufy.top_k_fraction=0.1", "regularizer.type=none",
                                   "distill.mlp_weight=1.0", "thresholds.target_sparsity=0.88",
                                   "thresholds.at_fraction=0.5"])),
    # issue 22: SwiGLU kept, output-aware thresholds, annealed (no swap shock), dropped-activation compensation
    "oa50": ("output-aware thresholds 50% (training-free)", ("eval", "output_aware", 0.5)),
    "oa70": ("output-aware thresholds 70% (training-free)", ("eval", "output_aware", 0.7)),
    "oa70_comp": ("output-aware thresholds 70% + compensation (training-free)",
                  ("eval", "output_aware", 0.7, True)),
    "cats70_comp": ("CATS 70% + compensation (training-free)", ("eval", "cats", 0.7, True)),
    "oa70_t": ("output-aware 70%, ramped over half the run + compensation",
               ("train", ["relufy.activation=output_aware", "relufy.target_sparsity=0.7", "regularizer.type=none",
                          "compensation.enabled=true"])),
    "oa70_gate_t": ("output-aware 70% on the gate score, ramped + compensation",
                    ("train", ["relufy.activation=output_aware", "relufy.target_sparsity=0.7", "relufy.score=gate",
                               "regularizer.type=none", "compensation.enabled=true"])),
    "oa85_t": ("output-aware 85%, ramped over half the run + compensation",
               ("train", ["relufy.activation=output_aware", "relufy.target_sparsity=0.85", "regularizer.type=none",
                          "compensation.enabled=true"])),
    "oa85_kl_t": ("output-aware 85%, ramped + distillation + compensation",
                  ("train", ["relufy.activation=output_aware", "relufy.target_sparsity=0.85", "regularizer.type=none",
                             "distill.weight=1.0", "compensation.enabled=true"])),
    "relu_anneal_l1_distill": ("ReLU annealed from SiLU over 25% + progressive L1 + distillation",
                               ("train", ["relufy.activation=relu", *PROSPARSE, "distill.weight=1.0",
                                          "anneal.fraction=0.25"])),
    # issue 30: the ReLU form PowerInfer runs (relu(gate) * up on every kept neuron), trained the way SwiGLU-kept won:
    # output-aware zeros ramped in while SiLU(gate) * up moves to relu(gate) * up, fixed thresholds fitted at the end
    "relu_oa70_t": ("ReLU form, output-aware 70%, annealed from SiLU over half the run",
                    ("train", ["relufy.activation=output_aware", "relufy.form=relu", "relufy.target_sparsity=0.7",
                               "regularizer.type=none"])),
    "relu_oa70_kl_t": ("ReLU form, output-aware 70%, annealed from SiLU + distillation",
                       ("train", ["relufy.activation=output_aware", "relufy.form=relu", "relufy.target_sparsity=0.7",
                                  "regularizer.type=none", "distill.weight=1.0"])),
    "relu_oa85_kl_t": ("ReLU form, output-aware 85%, annealed from SiLU + distillation",
                       ("train", ["relufy.activation=output_aware", "relufy.form=relu", "relufy.target_sparsity=0.85",
                                  "regularizer.type=none", "distill.weight=1.0"])),
    "relu_oa85_kl_pi_t": ("ReLU form, output-aware 85%, annealed + distillation + PowerInfer's predictors",
                          ("train", ["relufy.activation=output_aware", "relufy.form=relu",
                                     "relufy.target_sparsity=0.85", "regularizer.type=none", "distill.weight=1.0",
                                     *POWERINFER_PREDICTORS])),
    "relu_oa70_mlp_t": ("ReLU form, output-aware 70%, annealed from SiLU + layer-wise MLP distillation",
                        ("train", ["relufy.activation=output_aware", "relufy.form=relu", "relufy.target_sparsity=0.7",
                                   "regularizer.type=none", "distill.mlp_weight=1.0"])),
}


def measured(args) -> dict:
    """Every variant measured so far: DOCS/tradeoff.json (the published record), overlaid by this --out's
    results.json (newer measurements win), in VARIANTS order."""
    results = {}
    published = args.docs / "tradeoff.json"
    if published.is_file():
        results.update(json.loads(published.read_text())["results"])
    if (args.out / "results.json").is_file():
        results.update(json.loads((args.out / "results.json").read_text()))
    for entry in results.values():
        entry.setdefault("skips", skips_from_overrides(entry))
    return {k: results[k] for n in VARIANTS for k in [n, *sorted(k for k in results if k.startswith(n + "@"))]
            if k in results}


def legal_text(out: Path) -> Path:
    """One JSONL document per licence file (the other-domain held-out text)."""
    if not LICENSES.is_dir():
        sys.exit(f"error: {LICENSES} not found (Debian/Ubuntu base-files); the other-domain text comes from there")
    path = out / "legal.jsonl"
    with path.open("w") as f:
        for file in sorted(p for p in LICENSES.iterdir() if p.is_file()):
            f.write(json.dumps({"text": file.read_text(errors="replace")}) + "\n")
    return path


def run_key(name: str, args) -> str:
    """A variant's key in results.json (and its run folder): its name at the default budget, name@steps otherwise."""
    return name if args.steps == DEFAULT_STEPS else f"{name}@{args.steps}"


def train(name: str, overrides: list[str], args) -> tuple[Path, float]:
    run = args.out / run_key(name, args)
    done = run / "bench_done.json"
    if done.is_file() and json.loads(done.read_text()).get("steps") == args.steps:
        return run, json.loads(done.read_text())["train_seconds"]
    resume = args.resume and (run / "checkpoints").is_dir()
    cmd = [sys.executable, "-m", "sparsetune", "train", "quickstart", f"output_dir={run}", f"model.path={args.model}",
           f"train.max_steps={args.steps}", "train.lr=3e-4", "train.lr_warmup_steps=10", "train.eval_every=0",
           f"train.save_every={args.save_every}", f"train.eval_batches={args.batches}", "wandb.mode=disabled",
           *overrides, "--resume" if resume else "--overwrite"]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    spent = json.loads((run / "bench_partial.json").read_text())["train_seconds"] if resume and (
        run / "bench_partial.json").is_file() else 0.0
    start = time.time()
    try:
        subprocess.run(cmd, check=True, cwd=ROOT)
    finally:  # the wall time of an interrupted run counts when it is resumed
        if run.is_dir():
            (run / "bench_partial.json").write_text(json.dumps({"train_seconds": spent + time.time() - start}))
    seconds = spent + time.time() - start
    done.write_text(json.dumps({"train_seconds": seconds, "steps": args.steps, "command": cmd[1:]}))
    return run, seconds


def skips_from_overrides(entry: dict) -> str:
    """engine_skips for a variant measured before the column existed: its final activation from its overrides."""
    from sparsetune.activations import activation_class

    keys = dict(o.split("=", 1) for o in entry.get("overrides", []))
    name = keys.get("relufy.activation", entry.get("activation") or "silu")
    if any(k.startswith("thresholds.") for k in keys):
        name = activation_class(name).threshold_form or name
    return activation_class(name).rule_reads


def engine_skips(run: Path | None, activation: str | None) -> str:
    """Which MLP rows an engine skips for a zero neuron without predictors: "gate" (up + down), "product" (down only),
    "none" (no exact zeros); read from the run's final activation (or the evaluated one)."""
    from sparsetune.activations import build_activation

    if run is not None:
        from sparsetune.checkpoint.store import CheckpointStore

        spec = json.loads((CheckpointStore(run).latest_complete() / "activation_state.json").read_text())["activation"]
    else:
        spec = {"activation": activation or "silu"}
    spec = {k: v for k, v in spec.items() if k != "compensation"}
    return build_activation(spec).rule_reads


def measure(target: str, activation, target_sparsity, data_path, batches: int, args=None,
            no_compensation: bool = False, compensate: bool = False) -> tuple[dict, dict | None]:
    """Held-out figures on `data_path`, and with `args` (--tasks ...) the harness's scores per task."""
    from sparsetune.evaluation.command import EvalArgs, run_eval

    tasks = dict(tasks=tuple(args.tasks.split(",")), include_path=args.include_path, num_fewshot=args.num_fewshot,
                 limit=args.limit) if args is not None else {}
    result = run_eval(EvalArgs(target, data=data_path, seq_len=256, batches=batches, batch_size=2,
                               activation=activation, target_sparsity=target_sparsity,
                               no_compensation=no_compensation, compensate=compensate, **tasks))
    keep = ("perplexity", "loss", "tokens", "sparsity", "near_zero", "per_layer", "cett_sparsity")
    held = {k: result.held_out[k] for k in keep if k in result.held_out}
    return held, (result.downstream["tasks"] if result.downstream else None)


def downstream_settings(args, entry: dict) -> dict | None:
    """What a variant's harness scores depend on; equal settings in results.json mean they can be reused."""
    if not args.tasks:
        return None
    return {"tasks": args.tasks, "include_path": args.include_path, "num_fewshot": args.num_fewshot,
            "limit": args.limit, "model": args.model, "train_seconds": entry.get("train_seconds")}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, domain in zip(axes, ("code-docs", "legal")):
        for name, res in results.items():
            m = res["eval"][domain]
            trained = res["kind"] == "train"
            marker = "o" if trained else ("s" if name.startswith("cats") else "^")
            ax.scatter(100 * m.get("sparsity", 0.0), m["perplexity"], marker=marker, s=60,
                       color="tab:green" if trained else "tab:gray")
            ax.annotate(name, (100 * m.get("sparsity", 0.0), m["perplexity"]), fontsize=7,  # labels: docs table
                        xytext=(4, 3), textcoords="offset points")
            raw = res["eval"].get(f"{domain}-no-compensation")
            if raw:  # the same run without its compensation biases: an open circle
                ax.scatter(100 * raw.get("sparsity", 0.0), raw["perplexity"], marker="o", s=60, facecolors="none",
                           edgecolors="tab:green")
        dense_ft = results.get("dense_ft", {}).get("eval", {}).get(domain)
        if dense_ft:
            ax.axhline(dense_ft["perplexity"] * 1.1, color="tab:red", lw=0.8, ls="--",
                       label="dense fine-tuned + 10%")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlim(-3, 100)
        ax.set_xlabel("MLP activation sparsity (exact zeros, %)")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(f"SmolLM2-135M, held-out {domain}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Sparsity vs quality: training-free (grey) vs trained with {results_budget(results)} (green)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def results_budget(results: dict) -> str:
    tokens = {r["train_tokens"] for r in results.values() if r["kind"] == "train"}
    return f"{tokens.pop():,} tokens each" if len(tokens) == 1 else "training"


def table(results: dict) -> str:
    tasks = list(dict.fromkeys(t for r in results.values() for t in r.get("downstream", {}).get("tasks", {})))
    lines = ["| variant | tokens trained | code-docs perplexity | code-docs sparsity | engine skips (no predictors) "
             "| CETT sparsity 1% / 20% | without compensation | legal perplexity | legal sparsity | train time |"
             + "".join(f" {t} acc |" for t in tasks),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(tasks)]
    for name, res in results.items():
        code, legal = res["eval"]["code-docs"], res["eval"]["legal"]
        def sp(m):
            s = f"{100 * m.get('sparsity', 0.0):.1f}%"
            return s + (f" (near-zero {100 * m['near_zero']:.1f}%)" if "near_zero" in m else "")
        t = f"{res['train_seconds'] / 60:.1f} min" if res["kind"] == "train" else "-"
        scores = res.get("downstream", {}).get("tasks", {})
        accs = "".join(f" {acc(scores.get(task))} |" for task in tasks)
        raw = res["eval"].get("code-docs-no-compensation")
        raw = f"{raw['perplexity']:.2f}" if raw else "-"
        lines.append(f"| {res['label']} (`{name}`) | {res.get('train_tokens', 0):,} | {code['perplexity']:.2f} | "
                     f"{sp(code)} | {skip_cell(code, res.get('skips'))} | "
                     f"{cett_cell(code)} | {raw} | "
                     f"{legal['perplexity']:.2f} | {sp(legal)} | {t} |{accs}")
    return "\n".join(lines) + "\n" + winners(results) + slopes(results)


BANDS = [(0.45, 0.6), (0.6, 0.8), (0.8, 0.88), (0.88, 1.0)]


def winners(results: dict) -> str:
    """The lowest code-docs perplexity at each band of exact-zero sparsity, trained or not, with and without
    compensation (the same run measured both ways), and what an engine skips for it."""
    points = []
    for name, res in results.items():
        for key, how in (("code-docs", ""), ("code-docs-no-compensation", " without compensation")):
            m = res["eval"].get(key)
            if m and res.get("skips") != "none":
                points.append((m.get("sparsity", 0.0), m["perplexity"], f"`{name}`{how}", res.get("skips")))
    dense_ft = results.get("dense_ft", {}).get("eval", {}).get("code-docs", {}).get("perplexity")
    lines = []
    for lo, hi in BANDS:
        band = [p for p in points if lo <= p[0] < hi]
        if not band:
            continue
        def describe(point):
            s, ppl, who, skips = point
            ratio = f" ({ppl / dense_ft:.2f}x the dense fine-tune)" if dense_ft else ""
            return f"{who}, {ppl:.2f} at {100 * s:.1f}%{ratio}, an engine skips {ROWS[skips]}"

        best = min(band, key=lambda p: p[1])
        text = f"- {100 * lo:.0f}-{100 * hi:.0f}% exact zeros: {describe(best)}"
        gate = [p for p in band if p[3] == "gate"]
        if best[3] != "gate" and gate:
            text += f"; read from the gate alone: {describe(min(gate, key=lambda p: p[1]))}"
        lines.append(text)
    head = "\nBest point per sparsity band (code-docs; what an engine skips without predictors):\n\n"
    return (head + "\n".join(lines) + "\n") if lines else ""


ROWS = {"gate": "up + down rows", "product": "down rows only", "none": "nothing"}


def skip_cell(m: dict, skips: str | None) -> str:
    """The share of MLP neurons whose rows an engine can skip from the activation's own zeros, and which rows."""
    if skips is None:
        return "-"
    if skips == "none":
        return "0% (no exact zeros)"
    return f"{100 * m.get('sparsity', 0.0):.1f}% ({ROWS[skips]})"


def slopes(results: dict) -> str:
    """Tokens-to-quality between the budgets a variant was trained at: code-docs perplexity per doubling of tokens."""
    import math

    lines = []
    for name, res in results.items():
        if "@" in name or res["kind"] != "train":
            continue
        for other, longer in results.items():
            if other.startswith(name + "@"):
                p0, p1 = res["eval"]["code-docs"]["perplexity"], longer["eval"]["code-docs"]["perplexity"]
                t0, t1 = res["train_tokens"], longer["train_tokens"]
                per = (math.log(p1) - math.log(p0)) / math.log2(t1 / t0)
                lines.append(f"- `{name}`: {p0:.2f} at {t0:,} tokens -> {p1:.2f} at {t1:,} tokens "
                             f"({100 * (math.exp(per) - 1):+.1f}% perplexity per doubling of tokens)")
    return ("\nTokens-to-quality (code-docs):\n\n" + "\n".join(lines) + "\n") if lines else ""


def cett_cell(m: dict) -> str:
    """Effective sparsity at 1% and 20% relative MLP-output error (CETT), or '-' when not measured."""
    c = m.get("cett_sparsity") or {}
    lo, hi = c.get("0.01"), c.get("0.2")
    return "-" if lo is None or hi is None else f"{100 * lo:.1f}% / {100 * hi:.1f}%"


def acc(scores: dict | None) -> str:
    """acc ± stderr (acc_norm beside it when the task has one); '-' when not measured."""
    if not scores or scores.get("acc") is None:
        return "-"
    text = f"{scores['acc']:.3f}" + (f" ± {scores['acc_stderr']:.3f}" if scores.get("acc_stderr") is not None else "")
    return text + (f" (norm {scores['acc_norm']:.3f})" if scores.get("acc_norm") is not None else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="optimizer steps per trained variant (512 tokens each); other than the default, results are "
                        "kept as NAME@STEPS beside the default budget's")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (for --resume of long runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted trained variant from its newest checkpoint instead of restarting it")
    p.add_argument("--batches", type=int, default=8, help="held-out batches of 2 x 256 tokens per measurement")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_tradeoff")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite tradeoff.md / tradeoff.png from DOCS/tradeoff.json (nothing is measured)")
    p.add_argument("--tasks", default=None, metavar="T1,T2,...",
                   help="lm-evaluation-harness tasks scored per variant (one accuracy column each; needs lm-eval; the "
                        "harness's own tasks need internet)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of your own lm-eval task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction when < 1); the whole task by default")
    args = p.parse_args()
    if args.replot:
        published = measured(args)
        (args.docs / "tradeoff.md").write_text(table(published))
        plot(published, args.docs / "tradeoff.png")
        print(f"rewrote {args.docs / 'tradeoff.md'} and tradeoff.png from tradeoff.json and {args.out}/results.json")
        return
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: --only: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    legal = str(legal_text(args.out))
    results_file = args.out / "results.json"
    results = measured(args)
    start = time.time()
    for name in names:
        label, how = VARIANTS[name]
        key = run_key(name, args) if how[0] == "train" else name
        if how[0] == "train":
            run, seconds = train(name, how[1], args)
            entry = {"label": label, "kind": "train", "overrides": how[1], "train_seconds": seconds,
                     "train_tokens": args.steps * 2 * 256, "steps": args.steps, "skips": engine_skips(run, None)}
            target, activation, ts = str(run), None, None
        else:
            entry = {"label": label, "kind": "eval", "activation": how[1], "target_sparsity": how[2],
                     "skips": engine_skips(None, how[1]), "compensate": len(how) > 3 and how[3]}
            target, activation, ts = args.model, how[1], how[2]
        comp = {"compensate": bool(entry.get("compensate"))}
        settings = downstream_settings(args, entry)
        previous = results.get(key, {}).get("downstream")
        if settings is None:  # no --tasks: earlier scores of this very model are kept
            same_model = previous and all(previous["settings"].get(k) == v for k, v in
                                          (("model", args.model), ("train_seconds", entry.get("train_seconds"))))
            reuse = previous if same_model else None
        else:
            reuse = previous if previous and previous["settings"] == settings else None
        code_docs, scores = measure(target, activation, ts, None, args.batches,
                                    args if settings is not None and reuse is None else None, **comp)
        entry["eval"] = {"code-docs": code_docs,
                         "legal": measure(target, activation, ts, legal, args.batches, **comp)[0]}
        if "compensation.enabled=true" in entry.get("overrides", []):  # what the compensation buys
            entry["eval"]["code-docs-no-compensation"] = measure(target, None, None, None, args.batches,
                                                                 no_compensation=True)[0]
        if reuse is not None or scores is not None:
            entry["downstream"] = reuse or {"settings": settings, "tasks": scores}
        results[key] = entry
        c = entry["eval"]["code-docs"]
        print(f"[{key}] code-docs perplexity {c['perplexity']:.2f}, sparsity {100 * c.get('sparsity', 0):.1f}%  "
              f"({(time.time() - start) / 60:.1f} min so far)", flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    ordered = {k: results[k] for n in VARIANTS for k in [n, *sorted(k for k in results if k.startswith(n + "@"))]
               if k in results}  # the published record and this run's, in VARIANTS order
    args.docs.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "steps": args.steps, "tokens_per_step": 512, "held_out_batches": args.batches,
            "held_out": {"code-docs": "stdlib-docs eval split", "legal": str(LICENSES)},
            "command": "python scripts/bench_tradeoff.py " + " ".join(sys.argv[1:]), "torch_threads": os.cpu_count(),
            "downstream": downstream_settings(args, {})}
    (args.docs / "tradeoff.json").write_text(json.dumps({"meta": meta, "results": ordered}, indent=1))
    (args.docs / "tradeoff.md").write_text(table(ordered))
    plot(ordered, args.docs / "tradeoff.png")
    print(table(ordered))
    print(f"wrote {args.docs / 'tradeoff.md'}, tradeoff.json, tradeoff.png ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
