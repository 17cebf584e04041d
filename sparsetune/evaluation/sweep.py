"""The sparsity/quality curve of a model's predictors, against the best any predictor could do.

For each calibration target (per-layer thresholds set to a recall or mass-recall target on training batches), the
predicted masks give a skipped fraction and a perplexity. Beside each point, the same skipped fraction spent the
best way: per token, keep the neurons with the largest contribution |a_j| * ||W_down[:, j]|| (known only after
computing them all, so no real predictor reaches it) — the gap is what better predictors could still win. The best
masks never keep an inactive neuron, so where the predictor keeps more neurons than are active they skip more
(`best_skipped`) and are exact. With head predictors, the global head threshold is swept with KV entries written
and not written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sparsetune.dynamic.head_skipping import head_skipping
from sparsetune.evaluation.dynamic import _head_masks, _KeptFraction, _mlp_override, predicted_mask
from sparsetune.evaluation.perplexity import evaluate
from sparsetune.models.structure import sparse_mlps
from sparsetune.predictors.bank import PredictorBank, down_norm_reader
from sparsetune.predictors.calibration import calibrate_thresholds

HEAD_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # sigmoid values


def best_mask(keep_fraction: float):
    """Per token, the ceil(keep_fraction * m) neurons of largest output contribution (active ones only)."""

    def choose(mlp, x):
        gate, up, down = mlp.projections()
        a = mlp.activation(gate(x), up(x))
        importance = a.abs().float() * down.weight.detach().float().norm(dim=0)
        k = max(1, min(a.shape[-1], math.ceil(keep_fraction * a.shape[-1])))
        keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, importance.topk(k, dim=-1).indices, True)
        return keep & (a != 0)

    return choose


@torch.no_grad()
def predictor_sweep(model, bank: PredictorBank, batches: list[dict], calibration: list[dict], device,
                    targets, kind: str = "mass_recall", all_reduce=None) -> dict:
    """{'dense', 'neurons': [points], 'heads': [points]}; the bank's thresholds are restored afterwards."""
    saved = (bank.layer_thresholds, bank.calibration, bank.down_norms, bank.cfg.threshold)
    bank.down_norms = down_norm_reader(sparse_mlps(model))

    def perplexity() -> float:
        return evaluate(model, batches, None, device, all_reduce=all_reduce)["perplexity"]

    out = {"kind": kind, "dense": perplexity(), "neurons": [], "heads": []}
    try:
        for target in targets:
            calibrate_thresholds(model, bank, calibration, device, target, kind)
            tally = _KeptFraction()
            with _mlp_override(model, predicted_mask(bank), tally):
                ppl = perplexity()
            skipped = tally.sparsity(all_reduce)
            best = _KeptFraction()
            with _mlp_override(model, best_mask(1.0 - skipped), best):
                best_ppl = perplexity()
            out["neurons"].append({"target": target, "skipped": skipped, "perplexity_predicted": ppl,
                                   "best_skipped": best.sparsity(all_reduce), "perplexity_best": best_ppl})
        if bank.heads is not None:
            for t in HEAD_THRESHOLDS:
                bank.cfg.threshold = t
                point = {"threshold": t}
                for mode in ("kv_written", "kv_skipped"):
                    heads = _KeptFraction()
                    with _head_masks(model, bank, tally=heads), head_skipping(model, mode):
                        point[f"perplexity_{mode}"] = perplexity()
                    point["skipped"] = heads.sparsity(all_reduce)
                out["heads"].append(point)
    finally:
        bank.layer_thresholds, bank.calibration, bank.down_norms, bank.cfg.threshold = saved
    return out


SWEEP_COLUMNS = ["target", "skipped", "perplexity_predicted", "best_skipped", "perplexity_best"]


def sweep_table(sweep: dict) -> tuple[list[str], list[list]]:
    """The neuron points as a W&B table."""
    return SWEEP_COLUMNS, [[p[c] for c in SWEEP_COLUMNS] for p in sweep["neurons"]]


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
