#!/usr/bin/env python
"""Step-time overhead of sparsetune's sparsity machinery, measured in one run.

    python scripts/bench_overhead.py                      # SmolLM2-135M, seq 256, batch 2
    python scripts/bench_overhead.py --model PATH --steps 20 --seq-len 512

One real Trainer (the code path of `sparsetune train`) is switched between three variants
from one step to the next, so they share the same weights, optimizer and memory, and their
steps are interleaved in a rotating order so machine drift and position effects hit all alike:

  plain-silu   SiLU MLPs (the model's own math), no capture, no regularizer
  plain-relu   ReLU MLPs, no capture, no regularizer (the same math as the next, without the machinery)
  capture+l1   ReLU MLPs with activation capture (sparsity stats) + L1 regularizer in the loss
  +predictors  the same plus co-trained neuron predictors (rank --predictor-rank) and their optimizer step

Prints the median step time of each, the ratio capture+l1 / plain-relu (goal: <= 1.05), the
ratio +predictors / plain-relu (goal: <= 1.10), and capture+l1 / plain-silu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from sparsetune.activations.relu import ReLU
from sparsetune.activations.silu import SiLU
from sparsetune.recipe.loading import load_recipe
from sparsetune.sparsity.regularizers import get_regularizer
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.training.components.predictors import Predictors
from sparsetune.training.trainer import Trainer


def make_trainer(args, out: str) -> Trainer:
    recipe = load_recipe("quickstart", [
        f"model.path={args.model}", f"output_dir={out}", f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.batch}", "relufy.activation=relu", "distill.weight=0",
        "regularizer.type=l1", "regularizer.schedule=constant", "regularizer.coef=1.0",
        f"train.max_steps={10 * args.steps}", "wandb.mode=disabled", "predictor.enabled=true",
        f"predictor.rank={args.predictor_rank}", "predictor.dynamic_eval_batches=0",
    ])
    trainer = Trainer(recipe)
    trainer.setup()
    trainer.all_components = list(trainer.components)
    trainer.predictors = next(c for c in trainer.components if isinstance(c, Predictors))
    return trainer


def set_variant(trainer: Trainer, name: str) -> None:
    machinery = name in ("capture+l1", "+predictors")
    activation = SiLU() if name == "plain-silu" else ReLU()
    for mlp in sparse_mlps(trainer.model):
        mlp.activation = activation
        mlp.sink = trainer.recorder if machinery else None
    trainer.recorder.regularizer = get_regularizer("l1") if machinery else None
    with_predictors = name == "+predictors"
    trainer.components = [c for c in trainer.all_components if with_predictors or c is not trainer.predictors]
    trainer.recorder.consumers = [trainer.predictors.bank] if with_predictors else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--predictor-rank", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    names = ["plain-silu", "plain-relu", "capture+l1", "+predictors"]
    times: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, f"{tmp}/run")
        for i in range(args.warmup + args.steps):
            # rotate the order every round: no variant always runs first or after the same neighbour
            for name in names[i % len(names):] + names[: i % len(names)]:
                set_variant(trainer, name)
                t0 = time.perf_counter()
                metrics = trainer.train_step()
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[name].append(dt)
                assert (metrics["reg_loss"] > 0) == (name in ("capture+l1", "+predictors")), "variant switch failed"
                assert ("predictor_loss" in metrics) == (name == "+predictors"), "variant switch failed"
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq_len
    print(f"model={args.model} seq_len={args.seq_len} batch={args.batch} steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    for name, t in med.items():
        print(f"  {name:<11} median step {t * 1000:8.1f} ms   {tokens / t:8.1f} tok/s")
    ratio = med["capture+l1"] / med["plain-relu"]
    ratio_pred = med["+predictors"] / med["plain-relu"]
    ratio_silu = med["capture+l1"] / med["plain-silu"]
    print(f"overhead ratio capture+l1 / plain-relu = {ratio:.3f}   (goal <= 1.05)")
    print(f"overhead ratio +predictors / plain-relu = {ratio_pred:.3f}   (goal <= 1.10; predictors rank "
          f"{args.predictor_rank}, {trainer.predictors.bank.neuron_param_fraction():.1%} of MLP parameters)")
    print(f"overhead ratio capture+l1 / plain-silu = {ratio_silu:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_step_s": med, "ratio_vs_plain_relu": ratio,
                       "ratio_predictors_vs_plain_relu": ratio_pred, "ratio_vs_plain_silu": ratio_silu}, f, indent=1)


if __name__ == "__main__":
    main()
