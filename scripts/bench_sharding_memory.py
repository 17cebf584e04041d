#!/usr/bin/env python
"""Peak memory per rank under every launch preset and feature, measured beside the plan's bytes (issue 32).

    python scripts/bench_sharding_memory.py                            # the 0.5B table (all engines x features)
    python scripts/bench_sharding_memory.py --shape tiny --only fsdp:full,zero3:teacher   # a quick check
    python scripts/bench_sharding_memory.py --only zero3                # one engine, every feature

Each combination is one `sparsetune train --launch ENGINE --num-processes 2` of a few steps on this CPU (gloo),
on a Llama-shaped model with random weights the script builds once (no download; the tokenizer is the embedded
SmolLM2's, vocab 49152). The measured figure is the largest `memory/peak_rss_gb_max` the run logged (each rank's
resident-set peak per log window, tracking/memory.py), over the training steps only (the setup peak, where every
rank loads the whole model before it is sharded, is in `setup_peak_rss_gb_max`, kept in the JSON).

Beside it the plan (`sparsetune validate --launch`, launch/plan.py) for the same recipe on CPU (fp32): its model
state per rank and its total. A process's resident set also holds what does not scale with the model (torch,
DeepSpeed, gloo, the data, the interpreter): the same combination on the tiny shape is that baseline, measured too
(`baseline`), and `measured - baseline` is what the plan's model state (+ transients) should match.

Shapes (hidden / intermediate / layers / heads; untied embeddings):
  0.5b   1024 / 4096 / 24 / 16   503M parameters   fp32 DDP needs ~11 GiB per rank
  0.25b   768 / 3072 / 20 / 12   264M parameters
  tiny     64 /  128 /  2 /  4     6M parameters   (the baseline)

Results go to a JSON file (default runs/bench_sharding_memory.json), one entry per shape/engine/feature, written
after each combination; a combination already there is skipped, so an interrupted table resumes where it stopped
(--redo measures again). A combination whose plan does not fit the memory available now (psutil, with the baseline
added, for both processes) is skipped with a note instead of run (--force runs it anyway). Child processes get
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the resident set (glibc would otherwise keep freed heap pages:
the whole model each rank loaded before sharding would stay counted), and OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "0.25b": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=20, num_attention_heads=12),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
ENGINES = ["ddp", "zero2", "zero3", "zero3_offload", "fsdp"]
FEATURES = {
    "full": [],
    "lora": ["peft.method=lora"],
    "teacher": ["distill.weight=0.5"],
    "mlp": ["distill.mlp_weight=1.0"],
    "predictors": ["predictor.enabled=true", "predictor.dynamic_eval_batches=0"],
}
GIB = 1024**3


def build_model(shape: str, work: Path) -> Path:
    """A Llama of the shape with random weights (seed 0) and the embedded SmolLM2 tokenizer, saved once."""
    folder = work / f"model-{shape}"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsetune.sources.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m")[1])
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"built {folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    return folder


def overrides(args, model: Path, out: Path, feature: str) -> list[str]:
    return [f"model.path={model}", f"output_dir={out}", f"data.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}", "train.log_every=1",
            "train.eval_every=0", "train.eval_batches=2", "train.lr_warmup_steps=0", 'train.mixed_precision="no"',
            "model.dtype=float32", "wandb.mode=disabled", "distill.weight=0", *FEATURES[feature],
            *(["predictor.rank=4"] if feature == "predictors" and model.name.endswith("-tiny") else [])]
    # (rank 64, the default, is half the tiny MLP's parameters, above predictor.max_param_fraction)


def plan_of(engine: str, feature: str, model: Path, args, processes: int) -> dict:
    """The plan's per-rank bytes for the combination (on CPU: fp32)."""
    from sparsetune.launch.plan import plan_for_recipe
    from sparsetune.launch.presets import get_preset
    from sparsetune.recipe.loading import load_recipe

    recipe = load_recipe("quickstart", overrides(args, model, Path("unused"), feature))
    plan = plan_for_recipe(recipe, get_preset(engine), processes, str(model), on_gpu=False)
    return {"model_state_gib": plan.model_state / GIB, "total_gib": plan.total / GIB, "host_gib": plan.host / GIB,
            "parts_gib": {p.name: (p.device + p.host) / GIB for p in plan.parts + plan.transient},
            "params": plan.shape.params}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remove_run(out: Path) -> None:
    """Delete a run folder this script's `sparsetune train` made (it holds sparsetune's run marker); anything else
    at that path, a folder sparsetune did not make, is left alone."""
    from sparsetune.checkpoint.folders import RUN_MARKER

    if (out / RUN_MARKER).is_file():
        shutil.rmtree(out, ignore_errors=True)


def measure(engine: str, feature: str, model: Path, args, work: Path) -> dict:
    """One 2-process launch; the peaks it logged over its training steps."""
    import os

    out = work / "runs" / f"{model.name}-{engine}-{feature}"
    cmd = [sys.executable, "-m", "sparsetune", "train", "quickstart", *overrides(args, model, out, feature),
           "--overwrite", "--launch", engine, "--num-processes", str(args.processes),
           "--main-process-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "WANDB_MODE": "disabled"}
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - start
    if proc.returncode != 0:
        tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
        _remove_run(out)
        return {"error": f"exit {proc.returncode}", "log_tail": tail, "wall_s": wall}
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logs if "memory/peak_rss_gb_max" in m]
    result = {
        "peak_rss_gib_max": max(m["memory/peak_rss_gb_max"] for m in steps),
        "peak_rss_gib_mean": max(m["memory/peak_rss_gb_mean"] for m in steps),
        "per_step_max": [round(m["memory/peak_rss_gb_max"], 4) for m in steps],
        "setup_peak_rss_gib_max": steps[0].get("memory/setup_peak_rss_gb_max"),
        "wall_s": wall,
    }
    _remove_run(out)  # the checkpoint (GBs at 0.5B): only the metrics are kept
    return result


def table(results: dict, shape: str) -> str:
    rows = ["| engine | feature | measured peak / rank (GiB) | baseline (tiny) | measured - baseline | "
            "plan model state | plan total | (measured - baseline) / plan total |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for engine in ENGINES:
        for feature in FEATURES:
            r = results.get(f"{shape}/{engine}/{feature}")
            if r is None:
                continue
            base = results.get(f"tiny/{engine}/{feature}", {}).get("peak_rss_gib_max")
            plan = r["plan"]
            if "peak_rss_gib_max" not in r:
                why = r.get("skipped") or r.get("error", "")
                rows.append(f"| {engine} | {feature} | {why} | | | {plan['model_state_gib']:.2f} | "
                            f"{plan['total_gib']:.2f} | |")
                continue
            peak = r["peak_rss_gib_max"]
            net = peak - base if base is not None and shape != "tiny" else None
            ratio = f"{net / plan['total_gib']:.2f}" if net is not None and plan["total_gib"] > 0 else ""
            rows.append(f"| {engine} | {feature} | {peak:.2f} | {'' if base is None else f'{base:.2f}'} | "
                        f"{'' if net is None else f'{net:.2f}'} | {plan['model_state_gib']:.2f} | "
                        f"{plan['total_gib']:.2f} | {ratio} |")
    return "\n".join(rows)


def selected(only: str | None) -> list[tuple[str, str]]:
    combos = [(e, f) for e in ENGINES for f in FEATURES]
    if not only:
        return combos
    keep = []
    for item in only.split(","):
        engine, _, feature = item.strip().partition(":")
        if engine not in ENGINES or (feature and feature not in FEATURES):
            raise SystemExit(f"error: --only {item}: expected ENGINE[:FEATURE] with ENGINE in {', '.join(ENGINES)} "
                             f"and FEATURE in {', '.join(FEATURES)}")
        keep += [(e, f) for e, f in combos if e == engine and (not feature or f == feature)]
    return keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="0.5b")
    p.add_argument("--only", default=None, help="ENGINE[:FEATURE],... (default: every engine x feature)")
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_sharding_memory.json")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_sharding_memory",
                   help="where the random models and the (deleted after each run) run folders go")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--no-baseline", action="store_true", help="do not measure the tiny shape's baseline")
    p.add_argument("--redo", action="store_true", help="measure again what the JSON holds")
    p.add_argument("--force", action="store_true", help="run combinations whose plan exceeds the free memory")
    args = p.parse_args()
    combos = selected(args.only)
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the plans import DeepSpeed's estimators; this machine has no GPU
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    results = {k: v for k, v in results.items() if not k.startswith("_")}
    shapes = [args.shape] if args.shape == "tiny" or args.no_baseline else ["tiny", args.shape]

    import psutil

    for shape in shapes:
        model = build_model(shape, args.work)
        for engine, feature in combos:
            key = f"{shape}/{engine}/{feature}"
            if key in results and "peak_rss_gib_max" in results[key] and not args.redo:
                continue
            plan = plan_of(engine, feature, model, args, args.processes)
            base = results.get(f"tiny/{engine}/{feature}", {}).get("peak_rss_gib_max", 1.5)
            need = args.processes * (plan["total_gib"] + plan["host_gib"] + base)
            available = psutil.virtual_memory().available / GIB
            if need > 0.9 * available and not args.force:
                results[key] = {"plan": plan, "skipped": f"needs ~{need:.1f} GiB, {available:.1f} GiB available"}
                print(f"{key}: skipped ({results[key]['skipped']})", flush=True)
            else:
                print(f"{key}: running (plan: model state {plan['model_state_gib']:.2f} GiB per rank)", flush=True)
                results[key] = {"plan": plan, **measure(engine, feature, model, args, args.work)}
                r = results[key]
                print(f"{key}: " + (f"peak {r['peak_rss_gib_max']:.2f} GiB per rank ({r['wall_s']:.0f} s)"
                                    if "peak_rss_gib_max" in r else f"FAILED {r['error']}\n{r['log_tail']}"),
                      flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            meta = {"_settings": {"steps": args.steps, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                                  "processes": args.processes, "shapes": SHAPES}}
            args.json.write_text(json.dumps({**meta, **results}, indent=1) + "\n")
    print(f"\n{args.shape}: {args.processes} processes on CPU (gloo), fp32, micro-batch {args.micro_batch} x "
          f"{args.seq_len} tokens, {args.steps} steps; peak resident set per rank (the largest rank)\n")
    print(table(results, args.shape))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
