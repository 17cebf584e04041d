"""The sparsity/quality curve of a model's predictors, against the best any predictor could do.

For each calibration target (per-layer thresholds set to a recall or mass-recall target on training batches), the
predicted masks give a skipped fraction and a perplexity. Beside each point, the same skipped fraction spent the
best way: per token, keep the neurons with the largest contribution |a_j| * ||W_down[:, j]|| (known only after
computing them all, so no real predictor reaches it) — the gap is what better predictors could still win. The best
masks never keep an inactive neuron, so where the predictor keeps more neurons than are active they skip more
(`best_skipped`) and are exact. With head predictors, the global head threshold is swept with KV entries written
and not written. With `prompt` masks, each point also has the prompt-derived masks keeping the same fraction of
neurons (`prompt_skipped`, `perplexity_prompt`), measured on the continuation tokens, whose dense perplexity is
`prompt.dense_continuation`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from sparsetune.dynamic.head_skipping import head_skipping
from sparsetune.evaluation.dynamic import (
    KeptFraction,
    PromptMasks,
    best_mask,
    continuation_batches,
    head_masks,
    mlp_override,
    predicted_mask,
    prompt_override,
)
from sparsetune.evaluation.perplexity import evaluate
from sparsetune.predictors.bank import PredictorBank, down_norm_reader
from sparsetune.predictors.calibration import calibrate_thresholds
from sparsetune.surgery.sparse_mlp import sparse_mlps

HEAD_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # sigmoid values


@torch.no_grad()
def predictor_sweep(model, bank: PredictorBank, batches: list[dict], calibration: list[dict], device,
                    targets, kind: str = "mass_recall", all_reduce=None,
                    prompt: PromptMasks | None = PromptMasks()) -> dict:
    """{'dense', 'neurons': [points], 'heads': [points], 'prompt'}; the bank's thresholds are restored afterwards.
    `prompt` gives the prompt length of the prompt-mask curve (its keep / mass are set per point); None: no curve."""
    saved = (bank.layer_thresholds, bank.calibration, bank.down_norms, bank.cfg.threshold)
    bank.bind(model)
    bank.down_norms = down_norm_reader(sparse_mlps(model))

    def perplexity(on: list[dict] = batches) -> float:
        return evaluate(model, on, None, device, all_reduce=all_reduce)["perplexity"]

    out = {"kind": kind, "dense": perplexity(), "neurons": [], "heads": []}
    continuation = continuation_batches(batches, prompt) if prompt is not None else None
    if prompt is not None:
        out["prompt"] = {"prompt_fraction": prompt.fraction, "dense_continuation": perplexity(continuation),
                         "tokens": "continuation (after the prompt) only"}
    try:
        for target in targets:
            calibrate_thresholds(model, bank, calibration, device, target, kind)
            tally = KeptFraction()
            with mlp_override(model, predicted_mask(bank), tally):
                ppl = perplexity()
            skipped = tally.sparsity(all_reduce)
            best = KeptFraction()
            with mlp_override(model, best_mask(1.0 - skipped), best):
                best_ppl = perplexity()
            point = {"target": target, "skipped": skipped, "perplexity_predicted": ppl,
                     "best_skipped": best.sparsity(all_reduce), "perplexity_best": best_ppl}
            if prompt is not None:  # the prompt's neurons, as many as the predictor keeps
                kept = KeptFraction()
                with prompt_override(model, replace(prompt, keep=1.0 - skipped, mass=None), kept):
                    point["perplexity_prompt"] = perplexity(continuation)
                point["prompt_skipped"] = kept.sparsity(all_reduce)
            out["neurons"].append(point)
        if bank.heads is not None:
            for t in HEAD_THRESHOLDS:
                bank.cfg.threshold = t
                point = {"threshold": t}
                for mode in ("kv_written", "kv_skipped"):
                    heads = KeptFraction()
                    with head_masks(model, bank, tally=heads), head_skipping(model, mode):
                        point[f"perplexity_{mode}"] = perplexity()
                    point["skipped"] = heads.sparsity(all_reduce)
                out["heads"].append(point)
    finally:
        bank.layer_thresholds, bank.calibration, bank.down_norms, bank.cfg.threshold = saved
    return out


SWEEP_COLUMNS = ["target", "skipped", "perplexity_predicted", "best_skipped", "perplexity_best"]
PROMPT_COLUMNS = ["prompt_skipped", "perplexity_prompt"]


def sweep_table(sweep: dict) -> tuple[list[str], list[list]]:
    """The neuron points as a W&B table (with the prompt-mask columns when the sweep has them)."""
    columns = SWEEP_COLUMNS + (PROMPT_COLUMNS if "prompt" in sweep else [])
    return columns, [[p.get(c) for c in columns] for p in sweep["neurons"]]


def write_sweep(sweep: dict, stem: Path, title: str) -> tuple[Path, Path | None]:
    """STEM.json and STEM.png (skipped fraction vs perplexity: predicted, best possible, heads)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_name(stem.name + ".json")
    json_path.write_text(json.dumps(sweep, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return json_path, None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = sweep["neurons"]
    ax.plot([p["skipped"] for p in pts], [p["perplexity_predicted"] for p in pts], "o-",
            label=f"MLP neurons, predicted ({sweep['kind']} targets)")
    ax.plot([p["best_skipped"] for p in pts], [p["perplexity_best"] for p in pts], "s--",
            label="MLP neurons, best possible (largest contributions)")
    if "prompt" in sweep:
        ax.plot([p["prompt_skipped"] for p in pts], [p["perplexity_prompt"] for p in pts], "D-.", color="tab:red",
                label=f"MLP neurons, prompt-derived masks (continuation tokens, prompt "
                      f"{sweep['prompt']['prompt_fraction']:.0%})")
        ax.axhline(sweep["prompt"]["dense_continuation"], color="tab:red", lw=0.8, ls=":",
                   label="dense, continuation tokens")
    for mode, marker in (("kv_written", "^:"), ("kv_skipped", "v:")):
        if sweep["heads"]:
            ax.plot([p["skipped"] for p in sweep["heads"]], [p[f"perplexity_{mode}"] for p in sweep["heads"]],
                    marker, label=f"heads, {mode.replace('_', ' ')}")
    ax.axhline(sweep["dense"], color="gray", lw=0.8, label="dense")
    ax.set_xlabel("skipped fraction")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = stem.with_name(stem.name + ".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return json_path, png
