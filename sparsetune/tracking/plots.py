"""The sparsity/quality trade-off plot: mean activation sparsity vs held-out perplexity over a run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_tradeoff(rows: list[dict], out: Path, title: str) -> Path | None:
    """Scatter of (sparsity, perplexity) per evaluation, joined in step order and coloured by step."""
    rows = [r for r in rows if r.get("perplexity") is not None and r.get("sparsity") is not None]
    if not rows:
        return None
    use_near = all(r.get("sparsity") == 0 for r in rows) and all(r.get("near_zero_sparsity") is not None for r in rows)
    key = "near_zero_sparsity" if use_near else "sparsity"
    xs = [100 * r[key] for r in rows]
    ys = [r["perplexity"] for r in rows]
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.plot(xs, ys, color="0.75", zorder=1)
    sc = ax.scatter(xs, ys, c=steps, cmap="viridis", zorder=2)
    fig.colorbar(sc, ax=ax, label="step")
    for x, y, s in ((xs[0], ys[0], "start"), (xs[-1], ys[-1], "end")):
        ax.annotate(s, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("near-zero activations (%)" if use_near else "activation sparsity, exact zeros (%)")
    ax.set_ylabel("held-out perplexity")
    if max(ys) / max(min(ys), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
