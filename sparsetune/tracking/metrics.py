"""Flat metric names for metrics.jsonl and W&B, from the nested results of sparsity, predictor and
dynamic-activation measurements (one place that decides the names)."""

from __future__ import annotations


def layer_metrics(prefix: str, summary: dict) -> dict:
    """Flat keys from a SparsityStats summary: mean and per-layer (exact zeros and near-zero)."""
    out = {}
    if "sparsity" in summary:
        out[f"{prefix}/sparsity"] = summary["sparsity"]
        out.update({f"{prefix}/sparsity_layer/{i:02d}": v for i, v in enumerate(summary["per_layer"])})
    if "near_zero" in summary:
        thr = summary["near_zero_threshold"]
        out[f"{prefix}/near_zero_sparsity@{thr:g}"] = summary["near_zero"]
        out.update({f"{prefix}/near_zero_layer@{thr:g}/{i:02d}": v
                    for i, v in enumerate(summary["near_zero_per_layer"])})
    return out


def predictor_metrics(prefix: str, pred: dict, dyn: dict | None) -> dict:
    """Flat keys from predictor confusion summaries ({kind: {mean, per_layer}}) and dynamic-eval results."""
    out = {}
    for kind, summary in pred.items():
        for key, value in summary["mean"].items():
            out[f"{prefix}/predictor_{kind}/{key}"] = value
        for i, layer in enumerate(summary["per_layer"]):
            for key in ("recall", "mass_recall", "precision", "predicted_sparsity"):
                out[f"{prefix}/predictor_{kind}_layer/{key}/{i:02d}"] = layer[key]
    for mode, values in (dyn or {}).items():
        out[f"{prefix}/dynamic/{mode}/perplexity"] = values["perplexity"]
        for key in ("sparsity", "kv_sparsity"):  # kv_sparsity: KV entries left out (per KV head, under GQA)
            if values.get(key) is not None:
                out[f"{prefix}/dynamic/{mode}/{key}"] = values[key]
    return out


def predictor_tradeoff_fields(pred: dict, dyn: dict) -> dict:
    """The predictor columns of tradeoff.csv."""
    mean = pred.get("neurons", {}).get("mean", {})
    return {"predictor_recall": mean.get("recall"), "predictor_precision": mean.get("precision"),
            "predicted_sparsity": mean.get("predicted_sparsity"),
            "perplexity_dense_subset": dyn.get("dense", {}).get("perplexity"),
            "perplexity_oracle": dyn.get("oracle", {}).get("perplexity"),
            "perplexity_predicted": dyn.get("predicted", {}).get("perplexity")}
