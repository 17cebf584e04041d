#!/usr/bin/env python
"""One training step's throughput and MFU: sparsetune's own Trainer against a bare transformers + AdamW loop.

    python scripts/bench_train_step.py                               # a GPU: the smollm2 and 1b shapes, bf16
    python scripts/bench_train_step.py --device cpu --shape tiny     # the same code on the CPU (MFU omitted)
    python scripts/bench_train_step.py --shape 1b --batch 4 --seq-len 4096 --json step.json

For each shape a random-weights Llama is saved to a temporary HF folder (with the tests' small trained tokenizer,
`tests/tiny_models.py`; the model keeps the shape's vocabulary, so the LM head costs what it costs) and trained by:

  sparsetune     the real Trainer (`training/trainer.py`, the code path of `sparsetune train`) on the quickstart
                 recipe set up in code: relufy relu + l1 regularizer (constant coefficient), no distillation,
                 bf16 mixed precision on CUDA (full precision on the CPU); each step is `Trainer.train_step()`
  bare           transformers' AutoModelForCausalLM from the same folder with hidden_act=relu (the same math
                 without sparsetune's capture and penalty), torch.optim.AdamW with its defaults (foreach on
                 CUDA), torch.autocast(bf16) on CUDA, forward / backward / clip_grad_norm_(1.0) / step
  bare-loop      (CUDA only) the bare loop with AdamW(foreach=False), the optimizer sparsetune builds
                 (`training/optim.py`, for bitwise exact resume): separates the optimizer's share of the gap

in one process, one after the other (each one's memory freed before the next), on the same shape, micro-batch and
sequence length. The Trainer logs train/tokens_per_s as tokens / wall time over a logging window; here every step
is timed alone (CUDA synchronized before and after) and the first --warmup steps (allocator, autotuning, lazy
init) are dropped. Reported per loop: median step time, tokens/s, MFU = 6 * parameters * tokens / step time /
peak FLOP/s (the 6N rule: attention scores not counted; peak from --peak-tflops, default 989 = H200 bf16 dense on
CUDA, none on the CPU, where MFU is omitted) and peak GPU memory; and the ratio sparsetune / bare of tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny-model helpers (tests/tiny_models.py)

from sparsetune.recipe.loading import load_recipe  # noqa: E402
from sparsetune.training.trainer import Trainer  # noqa: E402
from tests.tiny_models import tiny_config, train_tokenizer  # noqa: E402

# Llama shapes (tiny_config's overrides); tiny is tiny_config's own (the tests' model).
SHAPES: dict[str, dict] = {
    "tiny": {},
    # SmolLM2-135M: its embedding is tied to the LM head, as in the released model
    "smollm2": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # a ~1.1B Llama (Llama-3.2-1B's layers with a 32k vocabulary)
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
}
# (micro-batch, sequence length) when not given
DEFAULT_BATCH = {("cuda", "smollm2"): (16, 2048), ("cuda", "1b"): (8, 2048)}
CPU_DEFAULT_BATCH = (4, 128)
H200_BF16_DENSE_TFLOPS = 989.0


def save_model(folder: Path, shape: str, tokenizer, seq_len: int, device: torch.device) -> int:
    """A random-weights Llama of `shape` with the tokenizer, saved as an HF folder; returns its parameter count."""
    from transformers import AutoModelForCausalLM

    overrides = dict(SHAPES[shape])
    vocab = overrides.pop("vocab_size", len(tokenizer))
    config = tiny_config("llama", vocab_size=vocab, max_position_embeddings=max(512, seq_len), **overrides)
    torch.manual_seed(0)
    with torch.device(device):  # random init of a 1B model is much faster on the GPU
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied embedding counts once
    model.to("cpu").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` steps after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sparsetune_loop(model_dir: Path, run_dir: Path, args, batch: int, seq_len: int, device: torch.device):
    recipe = load_recipe("quickstart", [
        f"model.path={model_dir}", f"output_dir={run_dir}", f"data.seq_len={seq_len}",
        f"train.micro_batch_size={batch}", "relufy.activation=relu", "regularizer.type=l1",
        "regularizer.schedule=constant", "regularizer.coef=1.0", "distill.weight=0", "predictor.enabled=false",
        f"train.max_steps={10 * (args.warmup + args.steps) + 10}", "train.lr=1e-4", "train.lr_warmup_steps=0",
        "train.eval_batches=1", "wandb.mode=disabled",
        "train.mixed_precision=" + ("bf16" if device.type == "cuda" else "'no'"),  # YAML reads a bare no as false
    ])
    trainer = Trainer(recipe)
    trainer.setup()
    if trainer.device.type != device.type:
        raise SystemExit(f"the Trainer runs on {trainer.device}, not on the asked {device}")
    losses: list[float] = []

    def step():
        metrics = trainer.train_step()
        losses.append(metrics["loss"])
        assert metrics["reg_loss"] > 0, "the l1 penalty is not in the step"

    try:
        times = timed_steps(step, device, args.warmup, args.steps)
    finally:
        trainer.folder.release()
        trainer.accelerator.free_memory()
    return times, losses, str(recipe.train.mixed_precision)


def bare_loop(model_dir: Path, args, batch: int, seq_len: int, device: torch.device, vocab: int,
              foreach: bool | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, hidden_act="relu").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=foreach)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq_len), generator=gen) for _ in range(4)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    losses: list[float] = []

    def step():
        ids = batches[len(losses) % len(batches)].to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # a logging loop reads the loss every step, as the Trainer does

    return timed_steps(step, device, args.warmup, args.steps), losses  # the model is freed on return


def figures(times: list[float], tokens: int, params: int, peak_tflops: float | None, device) -> dict:
    t = statistics.median(times)
    out = {"median_step_s": t, "min_step_s": min(times), "tokens_per_s": tokens / t, "steps_timed": len(times)}
    if peak_tflops:
        out["mfu"] = 6 * params * tokens / t / (peak_tflops * 1e12)
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench_shape(shape: str, args, tokenizer, device: torch.device, peak_tflops: float | None) -> dict:
    default = DEFAULT_BATCH.get((device.type, shape), CPU_DEFAULT_BATCH)
    batch, seq_len = args.batch or default[0], args.seq_len or default[1]
    tokens = batch * seq_len
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = save_model(model_dir, shape, tokenizer, seq_len, device)
        vocab = len(tokenizer)  # token ids the data can hold (< the model's vocabulary)
        result = {"shape": shape, "params": params, "micro_batch": batch, "seq_len": seq_len,
                  "tokens_per_step": tokens, "config": SHAPES[shape] or "tests/tiny_models.py tiny_config"}
        free(device)
        times, losses, precision = sparsetune_loop(model_dir, Path(tmp) / "run", args, batch, seq_len, device)
        result["mixed_precision"] = precision
        result["sparsetune"] = {**figures(times, tokens, params, peak_tflops, device), "last_loss": losses[-1]}
        free(device)
        variants = [("bare", None)] + ([("bare_adamw_foreach_false", False)] if device.type == "cuda" else [])
        for name, foreach in variants:
            times, losses = bare_loop(model_dir, args, batch, seq_len, device, vocab, foreach)
            result[name] = {**figures(times, tokens, params, peak_tflops, device), "last_loss": losses[-1]}
            free(device)
    result["ratio_sparsetune_over_bare"] = result["sparsetune"]["tokens_per_s"] / result["bare"]["tokens_per_s"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, help=f"comma-separated: {', '.join(SHAPES)} "
                   "(default: smollm2,1b on CUDA, tiny on the CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: 16 smollm2 / 8 1b on CUDA, 4 CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048 on CUDA, 128 CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak FLOP/s for MFU (default {H200_BF16_DENSE_TFLOPS:g} on CUDA: H200 bf16 dense; "
                        "none on the CPU: MFU omitted)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    shapes = (args.shape or ("smollm2,1b" if device.type == "cuda" else "tiny")).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown --shape {','.join(unknown)}; known: {', '.join(SHAPES)}")
    peak = args.peak_tflops or (H200_BF16_DENSE_TFLOPS if device.type == "cuda" else None)

    from sparsetune.data.corpus import corpus_files

    texts = [json.loads(line)["text"] for line in corpus_files()["train"].read_text().splitlines()]
    tokenizer = train_tokenizer(texts[:120], vocab_size=512)  # the tests' tokenizer (tests/conftest.py)
    report = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "threads": torch.get_num_threads(), "peak_tflops": peak, "warmup": args.warmup, "steps": args.steps,
              "shapes": {}}
    for shape in shapes:
        r = report["shapes"][shape] = bench_shape(shape, args, tokenizer, device, peak)
        print(f"{shape}: {r['params'] / 1e6:.1f}M params, micro-batch {r['micro_batch']} x {r['seq_len']} tokens, "
              f"{r['mixed_precision']} on {device}", flush=True)
        for loop in ("sparsetune", "bare", "bare_adamw_foreach_false"):
            if loop in r:
                f = r[loop]
                mfu = f"   MFU {f['mfu']:.1%}" if "mfu" in f else ""
                mem = f"   peak {f['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in f else ""
                print(f"  {loop:<25} median step {f['median_step_s'] * 1000:8.1f} ms   "
                      f"{f['tokens_per_s']:10.0f} tok/s{mfu}{mem}", flush=True)
        print(f"  ratio sparsetune / bare (tokens/s) = {r['ratio_sparsetune_over_bare']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
