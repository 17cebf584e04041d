"""The tables `sparsetune eval` prints (rich), from an EvalResult: printing kept apart from measuring."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from sparsetune.evaluation.command import EvalResult


def print_eval(result: EvalResult) -> None:
    """The tables of `sparsetune eval`."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    held = result.held_out
    summary = Table(title=f"{result.target} ({result.what}, activation {result.activation['activation']})")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("held-out perplexity", f"{held['perplexity']:.3f}")
    summary.add_row("tokens evaluated", str(held["tokens"]))
    summary.add_row("activation sparsity (exact zeros)", f"{held.get('sparsity', 0):.2%}")
    if "near_zero" in held:
        summary.add_row(f"near-zero activations (|a| <= {held['near_zero_threshold']:g})", f"{held['near_zero']:.2%}")
    cett = held.get("cett_sparsity", {})
    for budget, value in cett.items():
        summary.add_row(f"effective sparsity at CETT {budget} ({held['cett_tokens_per_layer']} tokens/layer)",
                        f"{value:.2%}")
    if result.downstream is not None:
        _downstream_rows(summary, result.downstream)
    console.print(summary)
    layers = Table(title="per-layer activation sparsity")
    layers.add_column("layer", justify="right")
    layers.add_column("exact zeros", justify="right")
    if "near_zero" in held:
        layers.add_column("near-zero", justify="right")
    for budget in cett:
        layers.add_column(f"CETT {budget}", justify="right")
    for i, v in enumerate(held.get("per_layer", [])):
        row = [str(i), f"{v:.2%}"]
        if "near_zero" in held:
            row.append(f"{held['near_zero_per_layer'][i]:.2%}")
        row += [f"{held['cett_sparsity_per_layer'][b][i]:.2%}" for b in cett]
        layers.add_row(*row)
    console.print(layers)
    if result.dynamic is not None:
        dyn = Table(title="dynamic activation: perplexity when skipping for real")
        for col in ("mode", "perplexity", "skipped (sparsity)"):
            dyn.add_column(col, justify="right" if col != "mode" else "left")
        for mode, values in result.dynamic.items():
            sp = values.get("sparsity")
            dyn.add_row(mode, f"{values['perplexity']:.3f}", "-" if sp is None else f"{sp:.2%}")
        console.print(dyn)
        kv = result.dynamic.get("heads_kv_skipped", {})
        pred = result.dynamic.get("predicted", {})
        if pred.get("recall") is not None:
            console.print(f"predicted masks on these tokens: recall {pred['recall']:.2%}, mass recall "
                          f"{pred['mass_recall']:.2%}")
        if "kv_policy" in kv:
            console.print(f"heads_kv_skipped: KV entries skipped {kv['kv_sparsity']:.2%} ({kv['kv_policy']})")
        if result.decode is not None:
            d = result.decode
            dec = Table(title=f"sparse decode: {d['new_tokens']} greedy tokens after a {d['prompt_tokens']}-token "
                              f"prompt, batch 1, {d['threads']} threads")
            for col in ("MLPs", "tokens/s", "MLP ms/token", "MLP share of time", "neurons computed"):
                dec.add_column(col, justify="right" if col != "MLPs" else "left")
            for mode in ("dense", "sparse"):
                m = d[mode]
                kept = f"{m['neurons_kept']:.1%}" if "neurons_kept" in m else "100%"
                dec.add_row(mode if mode == "dense" else "predicted (sparse kernel)", f"{m['tokens_per_s']:.2f}",
                            f"{m['mlp_ms_per_token']:.2f}", f"{m['mlp_share']:.0%}", kept)
            console.print(dec)
            console.print(f"speedup {d['speedup']:.2f}x end to end, {d['mlp_speedup']:.2f}x on the MLPs; "
                          f"{d['greedy_tokens_matching_dense']:.0%} of greedy tokens equal to dense; perplexity "
                          f"{result.dynamic['dense']['perplexity']:.2f} dense -> "
                          f"{result.dynamic.get('predicted', {}).get('perplexity', float('nan')):.2f} predicted")
        if "predicted" not in result.dynamic:
            console.print("no predictors found (train with predictor.enabled=true): dense and oracle modes only")


def _downstream_rows(summary: Table, downstream: dict) -> None:
    """One row per task and metric (acc, acc_norm, ...), value with its standard error, beside perplexity."""
    summary.add_section()
    for task, row in downstream["tasks"].items():
        shots = row.get("num_fewshot")
        n, total = row.get("examples", "?"), row.get("task_examples")
        how = f"{'' if shots is None else f'{shots}-shot, '}{n}{'' if total in (None, n) else f' of {total}'} examples"
        for metric, value in row.items():
            if metric in ("examples", "task_examples", "num_fewshot") or metric.endswith("_stderr") \
                    or "_stderr," in metric:
                continue
            err = row.get(metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr")
            shown = "-" if value is None else f"{value:.4f}" + ("" if err is None else f" ± {err:.4f}")
            summary.add_row(f"{task} {metric} ({how})", shown)
    summary.caption = f"downstream: {downstream['harness']}, the model as evaluated above"
