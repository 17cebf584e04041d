#!/usr/bin/env python
"""Batch-1 decode of one MLP block: dense vs computing only the active neurons, measured in one run.

    python scripts/bench_sparse_mlp.py                       # SmolLM2-135M and Llama-2-7B shapes, CPU
    python scripts/bench_sparse_mlp.py --shapes llama2-7b --sparsity 0.9 --device cuda

For each shape and sparsity s, a random set of (1-s)*m neurons (sorted, as a predictor's mask gives them; a new
mask for every call, as for every decoded token; gate rows are sign-flipped so that every neuron fires for the
test input, so every mask is exact) is computed by:
  gather  torch: index_select of the active gate/up rows + matvec, embedding_bag for down (any device)
  fused   sparsetune's C++/OpenMP kernel: one pass over the active rows, no copies (CPU; the JSON's "kernel"
          says whether it was built, with which flags, or why not)
and compared with the dense MLP (three F.linear matvecs) and with the same kernel computing all m neurons.
Weights are float32 and, as in a real decode, every call uses the next layer's weights (as many distinct layers
as fit in --max-gib), so caches do not flatter small models. Prints time per call, speedup over dense F.linear,
speedup over the same kernel on all neurons, and that speedup as a fraction of the ideal 1/(1-s) (the fair
measure: a kernel that merely reads memory faster than F.linear would otherwise look better than ideal).
Goal: >= 0.5 of ideal at 90% sparsity. --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsetune.activations import build_activation
from sparsetune.dynamic.kernels import DecodeWeights, kernel_in_use
from sparsetune.recipe.schema import relufy_config

SHAPES = {"smollm2-135m": (576, 1536, 30), "llama2-7b": (4096, 11008, 32)}  # hidden, intermediate, layers


def timed(fn, layers: int, reps: int, device) -> float:
    """Median seconds per call over `reps` rounds, each a pass over all layers: fn(round, layer)."""
    for i in range(layers):  # warm-up
        fn(reps, i)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(layers):
            fn(len(samples), i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / layers)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--sparsity", default="0.5,0.7,0.9,0.95")
    p.add_argument("--activation", default="relu", choices=["relu", "drelu", "relu2", "silu"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's default)")
    p.add_argument("--max-gib", type=float, default=4.0, help="memory for distinct layer weights per shape")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # What the "fused" column would run here (float32 weights): the built C++ kernel, or the gather kernel and why
    # not (build failure, device). Recorded in the JSON so a speed is never reported without its kernel.
    kernel = kernel_in_use(device, torch.float32, args.activation)
    kernels = ["gather"] + (["fused"] if kernel["kernel"] == "fused" else [])
    if kernel["kernel"] != "fused":
        print(f"fused kernel not timed: {kernel['reason']}")
    results = {"device": str(device), "threads": torch.get_num_threads(), "activation": args.activation,
               "kernel": kernel, "kernels_timed": kernels, "shapes": {}}
    print(f"device {device}, {torch.get_num_threads()} threads, activation {args.activation}, float32, batch 1")
    for shape in args.shapes.split(","):
        d, m, n_layers = SHAPES[shape]
        activation = build_activation(relufy_config(activation=args.activation))
        per_layer = 3 * d * m * 4
        layers = max(1, min(n_layers, int(args.max_gib * 2**30 // per_layer)))
        gen = torch.Generator().manual_seed(0)
        weights = [DecodeWeights(*(torch.randn(*s, generator=gen).div_(d ** 0.5).to(device)
                                   for s in ((m, d), (m, d), (d, m))), activation) for _ in range(layers)]
        x = torch.randn(d, generator=gen).to(device)
        for w in weights:  # every neuron fires for this x (gate > 0), so any mask below is exact
            w.w_gate *= torch.where(w.w_gate @ x >= 0, 1.0, -1.0)[:, None]
        dense = timed(lambda r, i, weights=weights, x=x: weights[i].dense(x), layers, args.reps, device)
        row = {"hidden": d, "intermediate": m, "layers_cycled": layers, "dense_us": dense * 1e6, "sparse": []}
        everything = torch.arange(m, device=device)
        base = {}
        for kern in kernels:  # the same kernel computing all m neurons: the fair denominator for its speedup
            base[kern] = timed(lambda r, i, weights=weights, kern=kern, x=x, everything=everything:
                               getattr(weights[i], kern)(x, everything), layers, args.reps, device)
            row[f"{kern}_all_neurons_us"] = base[kern] * 1e6
        print(f"\n{shape}: d={d}, m={m}, {layers} distinct layers ({layers * per_layer / 2**20:.0f} MiB); "
              f"dense (F.linear) {dense * 1e6:.1f} us/call; all neurons through " +
              ", ".join(f"{k} {base[k] * 1e6:.1f} us" for k in kernels))
        print(f"{'sparsity':>8} {'active':>7} {'ideal':>6} " + " ".join(
            f"{k + ' us':>10} {'vs dense':>9} {'vs all':>7} {'of ideal':>8}" for k in kernels))
        for s in (float(v) for v in args.sparsity.split(",")):
            k = max(1, round((1 - s) * m))
            # A fresh mask per call (as per token in a decode), so no round re-reads rows a cache still holds.
            idx = [[torch.randperm(m, generator=gen)[:k].sort().values.to(device) for _ in range(layers)]
                   for _ in range(args.reps + 1)]
            ideal = 1 / (1 - s)
            entry = {"sparsity": s, "active": k, "ideal_speedup": ideal}
            cells = []
            for kern in kernels:
                t = timed(lambda r, i, weights=weights, kern=kern, x=x, idx=idx:
                          getattr(weights[i], kern)(x, idx[r][i]), layers, args.reps, device)
                own = base[kern] / t  # speedup over the same kernel on all neurons: what the sparsity buys
                entry[kern] = {"us": t * 1e6, "speedup_vs_dense": dense / t, "speedup_vs_all_neurons": own,
                               "fraction_of_ideal": own / ideal}
                cells.append(f"{t * 1e6:>10.1f} {dense / t:>8.2f}x {own:>6.2f}x {own / ideal:>8.2f}")
            row["sparse"].append(entry)
            print(f"{s:>8.0%} {k:>7} {ideal:>5.1f}x " + " ".join(cells))
        results["shapes"][shape] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
