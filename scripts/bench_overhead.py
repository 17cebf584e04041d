#!/usr/bin/env python
"""Step-time overhead of sparsetune's sparsity machinery, measured in one run.

    python scripts/bench_overhead.py                      # SmolLM2-135M, seq 256, batch 2
    python scripts/bench_overhead.py --model PATH --steps 20 --seq-len 512

Variants share everything (the real Trainer, data, optimizer, accelerate) and their steps are
interleaved round-robin, so machine drift affects all of them alike:

  plain-silu   the model as shipped (plain transformers MLPs), no capture, no regularizer
  plain-relu   ReLU-fied, no capture, no regularizer (the same math as the next, without the machinery)
  capture+l1   ReLU-fied with activation capture (sparsity stats) + L1 regularizer in the loss

Prints the median step time of each and the ratio capture+l1 / plain-relu (goal: <= 1.05)
and capture+l1 / plain-silu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from sparsetune.recipe.loading import load_recipe
from sparsetune.surgery.relufy import restore_hf_mlps, sparse_mlps
from sparsetune.training.trainer import Trainer


def make_trainer(args, out: str, activation: str, machinery: bool) -> Trainer:
    recipe = load_recipe("quickstart", [
        f"model.path={args.model}", f"output_dir={out}", f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.batch}", f"relufy.activation={activation}", "distill.weight=0",
        "regularizer.type=l1" if machinery else "regularizer.type=none", "regularizer.schedule=constant",
        "regularizer.coef=1.0", f"train.max_steps={10 * args.steps}", "wandb.mode=disabled",
    ])
    trainer = Trainer(recipe)
    trainer.setup()
    if not machinery:
        for mlp in sparse_mlps(trainer.model):
            mlp.sink = None
        if activation == "silu":  # back to the stock transformers modules
            restore_hf_mlps(trainer.accelerator.unwrap_model(trainer.model))
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "plain-silu": make_trainer(args, f"{tmp}/a", "silu", machinery=False),
            "plain-relu": make_trainer(args, f"{tmp}/b", "relu", machinery=False),
            "capture+l1": make_trainer(args, f"{tmp}/c", "relu", machinery=True),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(args.warmup + args.steps):
            for name, trainer in variants.items():
                t0 = time.perf_counter()
                metrics = trainer.train_step()
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[name].append(dt)
            if i == args.warmup:
                reg = metrics.get("reg_loss")
                assert reg and reg > 0, "the capture+l1 variant must compute its regularizer"
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq_len
    print(f"model={args.model} seq_len={args.seq_len} batch={args.batch} steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    for name, t in med.items():
        print(f"  {name:<11} median step {t * 1000:8.1f} ms   {tokens / t:8.1f} tok/s")
    ratio = med["capture+l1"] / med["plain-relu"]
    ratio_silu = med["capture+l1"] / med["plain-silu"]
    print(f"overhead ratio capture+l1 / plain-relu = {ratio:.3f}   (goal <= 1.05)")
    print(f"overhead ratio capture+l1 / plain-silu = {ratio_silu:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_step_s": med, "ratio_vs_plain_relu": ratio,
                       "ratio_vs_plain_silu": ratio_silu}, f, indent=1)


if __name__ == "__main__":
    main()
