#!/usr/bin/env python
"""Training throughput of N-process DDP (or another preset) against one process, measured in one run.

    python scripts/bench_ddp.py                                   # SmolLM2-135M, 2 processes, 12 steps
    python scripts/bench_ddp.py --preset zero2 --processes 2 --steps 8
    python scripts/bench_ddp.py --model /path/to/tiny-model --seq-len 64

Both runs use the quickstart recipe with the same per-process micro-batch, so the multi-process run trains
N times the tokens per step. Throughput is the train/tokens_per_s logged after the first logging window
(step 1 carries start-up costs). Prints both throughputs, the ratio and the wall times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args, out: Path, launch: list[str]) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "sparsetune", "train", "quickstart", f"output_dir={out}", f"model.path={args.model}",
           f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}", f"train.max_steps={args.steps}",
           "train.log_every=2", "train.eval_every=0", "train.eval_batches=2", "wandb.mode=disabled",
           "distill.weight=0", *launch]
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][1:]
    return sum(rates) / len(rates), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", default="ddp")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="micro-batch per process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single, single_wall = run(args, Path(tmp) / "single", [])
        multi, multi_wall = run(args, Path(tmp) / "multi", ["--launch", args.preset, "--num-processes",
                                                           str(args.processes)])
    print(f"model {args.model}, {args.seq_len} tokens x {args.batch} sequences per process per step, "
          f"{args.steps} steps")
    print(f"1 process:                {single:8.1f} tokens/s  (wall {single_wall:.0f} s incl. start-up)")
    print(f"{args.processes} processes ({args.preset}): {multi:8.1f} tokens/s  "
          f"(wall {multi_wall:.0f} s incl. start-up)")
    print(f"throughput ratio {args.preset}-{args.processes} / single: {multi / single:.2f}x")


if __name__ == "__main__":
    main()
