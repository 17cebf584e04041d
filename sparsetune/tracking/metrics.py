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
    out.update(cett_metrics(prefix, summary))
    return out


def cett_metrics(prefix: str, summary: dict) -> dict:
    """Flat keys of the CETT-based effective sparsity (sparsity/cett.py `cett_report`), per budget: mean and
    per layer, beside the exact-zero sparsity."""
    out = {}
    for budget, mean in summary.get("cett_sparsity", {}).items():
        out[f"{prefix}/cett_sparsity@{budget}"] = mean
        out.update({f"{prefix}/cett_sparsity_layer@{budget}/{i:02d}": v
                    for i, v in enumerate(summary["cett_sparsity_per_layer"][budget])})
    return out


def conversion_metrics(conversion: dict) -> dict:
    """Flat keys of a run's conversion to per-layer thresholds (sparsity/thresholds.py `Conversion`): the step,
    held-out perplexity and sparsity just before and after, and every layer's threshold."""
    out = {"thresholds/converted_at_step": float(conversion["step"])}
    for when in ("before", "after"):
        for key in ("perplexity", "sparsity"):
            out[f"thresholds/{key}_{when}"] = conversion[when][key]
    out.update({f"thresholds/threshold_layer/{i:02d}": t for i, t in enumerate(conversion["thresholds"])})
    if conversion.get("fit_cett_per_layer"):
        cetts = conversion["fit_cett_per_layer"]
        out["thresholds/fit_cett_mean"] = sum(cetts) / len(cetts)
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
        for key in ("sparsity", "kv_sparsity", "recall", "mass_recall"):  # kv_sparsity: per KV head
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
