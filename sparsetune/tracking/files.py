"""Local metric files in the run folder: metrics.jsonl (every logged step and eval) and tradeoff.csv.

Each record is appended whole: a failed append (disk full) is cut back to the last complete line, and a line torn
by a kill mid-append is dropped with a notice when the run resumes, so a damaged tail never stops a later run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

from sparsetune.checkpoint.store import write_atomic

TRADEOFF_COLUMNS = ["step", "tokens", "perplexity", "eval_loss", "sparsity", "near_zero_sparsity", "reg_coef",
                    "predictor_recall", "predictor_precision", "predicted_sparsity",
                    # dynamic-activation perplexities, on the first predictor.dynamic_eval_batches held-out batches
                    "perplexity_dense_subset", "perplexity_oracle", "perplexity_predicted"]


def append_whole(path: Path, text: str) -> None:
    """Append `text` (whole lines) with one write; on failure the file is cut back to where it was."""
    with open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(text.encode())
            f.flush()
        except OSError:
            f.truncate(start)
            raise


def _complete_lines(path: Path, valid: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(lines to keep, dropped lines): a line without its newline or that does not parse is dropped."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, else a torn last line
    kept, dropped = [], [tail] if tail else []
    for ln in lines:
        (kept if valid(ln) else dropped).append(ln)
    return kept, dropped


def _json_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _csv_row(width: int) -> Callable[[str], bool]:
    def valid(line: str) -> bool:
        rows = list(csv.reader(io.StringIO(line)))
        if len(rows) != 1 or len(rows[0]) != width:
            return False
        try:
            float(rows[0][0])
        except ValueError:
            return rows[0][0] == "step"  # the header
        return True
    return valid


class MetricFiles:
    """Appends to metrics.jsonl and tradeoff.csv; `truncate_after(step)` drops rows from a later step
    (used when a run resumes from a checkpoint older than the last logged step)."""

    def __init__(self, run_dir: Path):
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tradeoff_path = run_dir / "tradeoff.csv"

    def log(self, record: dict) -> None:
        append_whole(self.metrics_path, json.dumps(record) + "\n")

    def add_tradeoff(self, row: dict) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TRADEOFF_COLUMNS, extrasaction="ignore", lineterminator="\n")
        if not self.tradeoff_path.exists():
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in TRADEOFF_COLUMNS})
        append_whole(self.tradeoff_path, buf.getvalue())

    def tradeoff_rows(self) -> list[dict]:
        if not self.tradeoff_path.exists():
            return []
        with open(self.tradeoff_path, newline="") as f:
            return [
                {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)
            ]

    def drop_torn_lines(self, notice: Callable[[str], None]) -> None:
        """Remove lines torn by a kill or a full disk mid-append (resume calls this before appending again)."""
        for path, valid in ((self.metrics_path, _json_line), (self.tradeoff_path, _csv_row(len(TRADEOFF_COLUMNS)))):
            if not path.exists():
                continue
            kept, dropped = _complete_lines(path, valid)
            if dropped:
                write_atomic(path, "".join(ln + "\n" for ln in kept))
                notice(f"resume: dropped {len(dropped)} torn line(s) from {path} (an append cut short by a kill or a "
                       f"full disk): {dropped[0][:60]!r}")

    def truncate_after(self, step: int) -> None:
        if self.metrics_path.exists():
            kept = [ln for ln in self.metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
            write_atomic(self.metrics_path, "".join(ln + "\n" for ln in kept))
        if self.tradeoff_path.exists():
            lines = self.tradeoff_path.read_text().splitlines()
            kept = lines[:1] + [ln for ln in lines[1:] if int(float(ln.split(",")[0])) <= step]
            write_atomic(self.tradeoff_path, "".join(ln + "\n" for ln in kept))
