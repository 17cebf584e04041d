#!/usr/bin/env python
"""How much cheaper a predictor-only step is than a full training step, measured in one run.

    python scripts/bench_predictor_phase.py                       # SmolLM2-135M, seq 256, batch 2
    python scripts/bench_predictor_phase.py --steps 6 --seq-len 512

Two real Trainers (the code path of `sparsetune train`) on the same model and data, their steps interleaved:

  full            ReLU + L1 + co-trained predictors: forward with a graph, backward through the model, two optimizers
  predictor-only  train.freeze_model (the FrozenModel engine): the model runs forward without building a graph;
                  only the predictors' loss is backpropagated (recipes/predictors_only.yaml)

Prints tokens/s of each and their ratio: the factor by which a predictor-only phase gives the predictors more
tokens in the same wall time (for example after `sparsetune export`, `sparsetune train predictors_only
model.path=EXPORT`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from sparsetune.recipe.loading import load_recipe
from sparsetune.training.trainer import Trainer


def make_trainer(args, out: str, frozen: bool) -> Trainer:
    overrides = [f"model.path={args.model}", f"output_dir={out}", f"data.seq_len={args.seq_len}",
                 f"train.micro_batch_size={args.batch}", "relufy.activation=relu", "distill.weight=0",
                 "regularizer.schedule=constant", f"train.max_steps={10 * args.steps}", "wandb.mode=disabled",
                 "predictor.enabled=true", f"predictor.rank={args.predictor_rank}",
                 "predictor.dynamic_eval_batches=0", "predictor.train_token_fraction=1.0"]
    if frozen:
        overrides += ["train.freeze_model=true", "regularizer.type=none"]
    trainer = Trainer(load_recipe("quickstart", overrides))
    trainer.setup()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--predictor-rank", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"full": [], "predictor-only": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {"full": make_trainer(args, f"{tmp}/full", False),
                    "predictor-only": make_trainer(args, f"{tmp}/frozen", True)}
        for i in range(args.warmup + args.steps):
            for name in (list(trainers) if i % 2 == 0 else list(reversed(trainers))):
                t0 = time.perf_counter()
                metrics = trainers[name].train_step()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                assert metrics["predictor_loss"] > 0
    tokens = args.batch * args.seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: tokens / v for k, v in med.items()}
    ratio = rate["predictor-only"] / rate["full"]
    print(f"model={args.model} seq_len={args.seq_len} batch={args.batch} steps={args.steps} "
          f"threads={torch.get_num_threads()} predictor rank={args.predictor_rank} (every token)")
    for name in med:
        print(f"  {name:<15} median step {med[name] * 1000:8.1f} ms   {rate[name]:8.1f} tok/s")
    print(f"predictor-only / full tokens per second = {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_step_s": med, "tokens_per_s": rate, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
