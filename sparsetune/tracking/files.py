"""Local metric files in the run folder: metrics.jsonl (every logged step and eval) and tradeoff.csv."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

TRADEOFF_COLUMNS = ["step", "tokens", "perplexity", "eval_loss", "sparsity", "near_zero_sparsity", "reg_coef",
                    "predictor_recall", "predictor_precision", "predicted_sparsity",
                    # dynamic-activation perplexities, on the first predictor.dynamic_eval_batches held-out batches
                    "perplexity_dense_subset", "perplexity_oracle", "perplexity_predicted"]


class MetricFiles:
    """Appends to metrics.jsonl and tradeoff.csv; `truncate_after(step)` drops rows from a later step
    (used when a run resumes from a checkpoint older than the last logged step)."""

    def __init__(self, run_dir: Path):
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tradeoff_path = run_dir / "tradeoff.csv"

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def add_tradeoff(self, row: dict) -> None:
        new = not self.tradeoff_path.exists()
        with open(self.tradeoff_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TRADEOFF_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in TRADEOFF_COLUMNS})

    def tradeoff_rows(self) -> list[dict]:
        if not self.tradeoff_path.exists():
            return []
        with open(self.tradeoff_path, newline="") as f:
            return [
                {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)
            ]

    def truncate_after(self, step: int) -> None:
        if self.metrics_path.exists():
            kept = [ln for ln in self.metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
            _atomic_write(self.metrics_path, "".join(ln + "\n" for ln in kept))
        if self.tradeoff_path.exists():
            lines = self.tradeoff_path.read_text().splitlines()
            kept = lines[:1] + [ln for ln in lines[1:] if int(float(ln.split(",")[0])) <= step]
            _atomic_write(self.tradeoff_path, "".join(ln + "\n" for ln in kept))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
