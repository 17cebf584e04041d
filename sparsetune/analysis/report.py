"""The analysis report: analysis.json (every figure), analysis.md (what they mean, with the figures), PNG figures
(per-layer curves, the layer x distance inertia heatmap, prompt coverage curves), and the same to W&B."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGURES = ("sparsity", "inertia", "inertia_heatmap", "history", "prompt_overlap", "heads")

# (key, label, format, meaning) of the per-layer figures, in the order of the report's tables
MEASURES = [
    ("exact_zero", "exact-zero sparsity", "pct", "share of activations exactly 0"),
    ("near_zero", "near-zero sparsity", "pct", "share with |a| <= the near-zero threshold"),
    ("cett_1pct", "CETT sparsity @1%", "pct", "share of neurons one per-layer threshold drops at 1% relative MLP "
     "output error"),
    ("cett_20pct", "CETT sparsity @20%", "pct", "the same at 20% error"),
    ("active_fraction", "active fraction", "pct", "mean share of active neurons per token (the definition above)"),
    ("inertia_consecutive", "inertia: consecutive", "num", "Jaccard overlap of the active sets of consecutive tokens"),
    ("inertia_random", "inertia: random pairs", "num", "the same for random tokens of different sequences (chance)"),
    ("same_token", "same token, other context", "num", "Jaccard of one token id's active sets in different sequences"),
    ("history_dependence", "history dependence", "num", "1 - that: 0 when the token id alone fixes the active set"),
    ("token_explained", "explained by token id", "pct", "share of the overlap beyond chance the token id accounts "
     "for; the rest is context"),
    ("prompt_count@0.5", "prompt coverage (count) @50%", "pct", "share of a continuation token's active neurons "
     "among the prompt's top 50% of neurons"),
    ("prompt_mass@0.5", "prompt coverage (mass) @50%", "pct", "share of its activation mass they carry"),
    ("head_top_quarter_share", "head norm in top quarter", "pct", "share of a token's attention-head output norm "
     "in its top quarter of heads"),
    ("heads_for_90pct", "heads for 90% of norm", "pct", "fraction of heads a token needs for 90% of the norm"),
]


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if kind == "pct" else f"{value:.3f}"


def write_report(result: dict, out: Path) -> list[Path]:
    """analysis.json, analysis.md and the figures in `out`; returns the files written (figures last)."""
    out.mkdir(parents=True, exist_ok=True)
    figures = [p for p in (_plot(name, result, out / f"{name}.png") for name in FIGURES) if p is not None]
    json_path = out / "analysis.json"
    json_path.write_text(json.dumps(result, indent=1))
    md_path = out / "analysis.md"
    md_path.write_text(markdown(result, [p.name for p in figures]))
    return [json_path, md_path, *figures]


def summary(result: dict) -> str:
    """One line of headline numbers (means over layers)."""
    m = result["means"]
    return (f"analyzed {result['tokens']} tokens in {result['seconds']:.0f} s; mean over layers: active "
            f"{_fmt(m['active_fraction'], 'pct')} ({'a != 0' if result['exact_zeros'] else 'CETT-20%'}), inertia "
            f"{_fmt(m['inertia_consecutive'], 'num')} consecutive vs {_fmt(m['inertia_random'], 'num')} random, "
            f"history dependence {_fmt(m['history_dependence'], 'num')}, prompt's top 50% cover "
            f"{_fmt(m['prompt_count@0.5'], 'pct')} of active neurons / {_fmt(m['prompt_mass@0.5'], 'pct')} of mass")


def markdown(result: dict, figures: list[str]) -> str:
    means, layers = result["means"], result["layers"]
    lines = [
        f"# Activation analysis: {result['target']}",
        "",
        f"{result['what']}, activation `{result['activation']}`; {result['sequences']} held-out sequences x "
        f"{result['seq_len']} tokens of `{result['data']}` ({result['tokens']} tokens), perplexity "
        f"{result['perplexity']:.3f}; device {result['device']}, {result['seconds']:.0f} s "
        "(`sparsetune analyze`).",
        "",
        f"**Active neurons**: {result['active_definition']}. Positions from 1 on (the first token of a sequence "
        "attends only to itself). Prompt: the first "
        f"{result['prompt_fraction']:.0%} of each sequence. CETT thresholds fitted on {result['cett_tokens']} "
        "sampled tokens per layer.",
        "",
        "## Summary (mean over layers)",
        "",
        "| measure | mean | what it is |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {label} | {_fmt(means.get(key), kind)} | {meaning} |" for key, label, kind, meaning in MEASURES]
    sections = [
        ("Sparsity", "sparsity", "Exact zeros, near zeros and CETT effective sparsity per layer."),
        ("Activation inertia", "inertia", "Overlap of the active sets of consecutive tokens against random tokens "
         "from other sequences, and of the same token id in another sequence (history)."),
        (None, "inertia_heatmap", "Overlap of tokens d apart (columns) per layer (rows); the last column is random "
         "pairs from other sequences."),
        ("History dependence", "history", "1 - Jaccard of one token id's active sets across contexts (0: the id "
         "fixes the mask), and the share of the overlap beyond chance that the id explains."),
        ("Prompt-to-continuation overlap", "prompt_overlap", "Share of each continuation token's active neurons "
         "(left) and activation mass (right) that the prompt's top-k neurons cover, per layer (thin) and mean "
         "(thick); the dashed diagonal is a random kept set."),
        ("Head activity", "heads", "Concentration of attention-head output norms per token."),
    ]
    for title, name, caption in sections:
        if f"{name}.png" not in figures:
            continue
        if title:
            lines += ["", f"## {title}", ""]
        lines += [caption, "", f"![{name}]({name}.png)", ""]
    po = result["prompt_overlap"]
    lines += ["", "### Prompt coverage by kept fraction (mean over layers)", "",
              "| kept fraction | " + " | ".join(f"{k:g}" for k in po["kept_fractions"]) + " |",
              "| --- |" + " ---: |" * len(po["kept_fractions"])]
    for kind in ("count", "mass"):
        cols = list(zip(*po[kind]))
        lines.append(f"| {kind} | " + " | ".join(_fmt(_mean(c), "pct") for c in cols) + " |")
    lines += ["", "## Per layer", "",
              "| layer | " + " | ".join(label for _, label, _, _ in MEASURES) + " |",
              "| ---: |" + " ---: |" * len(MEASURES)]
    for row in layers:
        lines.append(f"| {row['layer']} | " + " | ".join(_fmt(row.get(key), kind) for key, _, kind, _ in MEASURES)
                     + " |")
    return "\n".join(lines) + "\n"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _series(result: dict, key: str) -> list[float]:
    return [float("nan") if row.get(key) is None else row[key] for row in result["layers"]]


def _plot(name: str, result: dict, path: Path) -> Path | None:
    layers = [row["layer"] for row in result["layers"]]
    title = f"{Path(result['target']).name} ({result['activation']})"
    if name == "heads" and all(row.get("heads_for_90pct") is None for row in result["layers"]):
        return None
    if name == "prompt_overlap":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110, sharey=True)
        po = result["prompt_overlap"]
        ks = po["kept_fractions"]
        cmap = plt.get_cmap("viridis")
        for ax, kind in zip(axes, ("count", "mass")):
            for i, row in enumerate(po[kind]):
                ax.plot(ks, [float("nan") if v is None else v for v in row], color=cmap(i / max(1, len(layers) - 1)),
                        lw=0.7, alpha=0.6)
            ax.plot(ks, [_mean(c) for c in zip(*po[kind])], color="black", lw=2.2, label="mean over layers")
            ax.plot([0, 1], [0, 1], "--", color="gray", lw=0.8, label="random kept set (count)")
            ax.set_title(f"continuation {'active neurons' if kind == 'count' else 'activation mass'} covered")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("coverage")
        fig.supxlabel("kept fraction of neurons (the prompt's top by activation mass)", fontsize=10)
        axes[0].legend(fontsize=8, loc="lower right")
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(1, len(layers) - 1)))
        fig.colorbar(sm, ax=axes, label="layer")
        fig.suptitle(f"{title}: prompt ({result['prompt_fraction']:.0%}) -> continuation", fontsize=10)
    elif name == "inertia_heatmap":
        ib = result["inertia_by_distance"]
        grid = [[float("nan") if v is None else v for v in row] + [_nan(r["inertia_random"])]
                for row, r in zip(ib["jaccard"], result["layers"])]
        fig, ax = plt.subplots(figsize=(1.2 + 0.65 * len(grid[0]), 1.5 + 0.16 * len(layers)), dpi=110)
        values = [v for row in grid for v in row if v == v]
        lo, hi = (min(values), max(values)) if values and max(values) - min(values) > 1e-6 else (0.0, 1.0)
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=lo, vmax=hi, origin="lower")  # the data's range
        ax.set_xticks(range(len(grid[0])), [str(d) for d in ib["distances"]] + ["rand"])
        stride = max(1, len(layers) // 15)
        ax.set_yticks(range(0, len(layers), stride), [str(v) for v in layers[::stride]])
        ax.set_xlabel("token distance d")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="Jaccard of active sets")
        ax.set_title(f"{title}: inertia", fontsize=10)
    else:
        curves = {
            "sparsity": [("exact_zero", "exact zeros"), ("near_zero", "near zero"), ("cett_1pct", "CETT 1%"),
                         ("cett_20pct", "CETT 20%"), ("active_fraction", "active fraction")],
            "inertia": [("inertia_consecutive", "consecutive tokens"), ("inertia_random", "random pairs, other "
                         "sequences"), ("same_token", "same token id, other sequence")],
            "history": [("history_dependence", "history dependence (1 - same-token Jaccard)"),
                        ("token_explained", "share explained by token id")],
            "heads": [("head_top_quarter_share", "norm share of the top quarter of heads"),
                      ("heads_for_90pct", "fraction of heads for 90% of norm")],
        }[name]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for key, label in curves:
            ax.plot(layers, _series(result, key), "o-", ms=3, label=label)
        if name == "heads" and result["heads"].get("uniform_top_quarter") is not None:
            ax.axhline(result["heads"]["uniform_top_quarter"], color="gray", lw=0.8, ls="--",
                       label="all heads equal (top quarter)")
        ax.set_xlabel("layer")
        ax.set_ylabel({"sparsity": "share of neurons", "inertia": "Jaccard of active sets",
                       "history": "share", "heads": "share"}[name])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{title}: {name}", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _nan(value) -> float:
    return float("nan") if value is None else value


def log_wandb(result: dict, files: list[Path], out: Path, mode: str, project: str) -> None:
    """The means as metrics (analysis/...), the per-layer table and every figure, in one W&B run under `out`."""
    from sparsetune.recipe.schema import WandbSection
    from sparsetune.tracking.wandb_run import WandbRun

    config = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    run = WandbRun(WandbSection(mode=mode, project=project, name=f"analyze-{Path(result['target']).name}",
                                tags=["analyze"]), out, config)
    try:
        run.log({f"analysis/{k}": v for k, v in result["means"].items() if v is not None}, step=0)
        columns = list(result["layers"][0])
        run.log_table("analysis_layers", columns, [[row[c] for c in columns] for row in result["layers"]], step=0)
        for path in files:
            if path.suffix == ".png":
                run.log_image(f"analysis_plot/{path.stem}", path, step=0)
    finally:
        run.finish()
