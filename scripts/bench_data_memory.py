"""Peak memory per process of the data path of `sparsetune train`, in a real multi-process run.

Builds a deterministic synthetic corpus (random pseudo-words, at least --tokens tokens in the training split for
the chosen tokenizer), then launches --nproc processes with torchrun that do what the trainer does for data:
`load_text_splits`, `pack` of both splits inside `accelerator.main_process_first()`, then draw batches from a
`BatchStream`. Each process reports its peak RSS (ru_maxrss), sampled peaks of anonymous (private) and file-backed
(shared libraries, memory-mapped files: page cache) RSS, and "kept anon": the private memory it still holds after
the batches over what it held just before packing (the rows, when each process has its own copy of them).

--impl old runs the in-memory packing that the cached rows replaced (`old_pack` below, or `pack` as committed at
--old-ref, read with `git show`), --impl new the working tree's `pack`, --impl both runs one after the other (each
with an empty packed cache and an empty datasets cache) and prints a one-line summary with the old/new ratio and
whether every rank drew identical batches.

    python scripts/bench_data_memory.py --impl both                  # 20M tokens, SmolLM2 tokenizer, 2 processes
    python scripts/bench_data_memory.py --impl new --tokens 2000000 --tokenizer /path/to/hf/folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------- the corpus


def _vocabulary(rng: random.Random, size: int = 8000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "qu", "ng", "er", "on"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(size)]


def _documents(seed: int):
    """An endless, deterministic stream of documents of 50..3000 Zipf-distributed pseudo-words in sentences."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    while True:
        words = rng.choices(vocab, weights=weights, k=rng.randint(50, 3000))
        sentences, i = [], 0
        while i < len(words):
            n = rng.randint(6, 20)
            sentences.append(" ".join(words[i : i + n]).capitalize() + rng.choice(".,;?!."))
            i += n
        yield " ".join(sentences)


def build_corpus(path: Path, tokenizer, tokens: int, eval_fraction: float, seed: int = 0) -> dict:
    """Write a .jsonl corpus whose training split has at least `tokens` tokens (estimated from a sample, +8%)."""
    docs = _documents(seed)
    sample = [next(docs) for _ in range(200)]
    per_char = sum(len(ids) + 1 for ids in tokenizer(sample, add_special_tokens=False)["input_ids"]) / sum(
        map(len, sample))
    chars_needed = tokens * 1.08 / (1 - eval_fraction) / per_char
    docs, written, count = _documents(seed), 0, 0
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        while written < chars_needed:
            text = next(docs)
            f.write(json.dumps({"text": text}) + "\n")
            written, count = written + len(text), count + 1
    os.replace(tmp, path)
    return {"documents": count, "chars": written, "estimated_tokens": int(written * per_char)}


# ------------------------------------------------------------------------------------------ one process (rank)


class PeakSampler:
    """Samples /proc/self/status every few ms and keeps the peaks of RssAnon and RssFile (ru_maxrss has only
    their sum)."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak = every_s, {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        now = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in self.peak:
                    now[key] = int(value.split()[0]) * 1024
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def old_pack(ds, tokenizer, text_field: str, seq_len: int, what: str):
    """`pack` before the packed-rows cache (verbatim but for the imports): tokenized by `datasets`, then the
    whole token stream gathered into one in-memory int32 array, in every process."""
    import numpy as np

    from sparsetune.data.text_datasets import PackedData
    from sparsetune.errors import SparsetuneError

    eos = tokenizer.eos_token_id

    def tokenize(batch):
        enc = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"ids": [ids + [eos] if eos is not None else ids for ids in enc]}

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {what}")
    flat = np.fromiter((t for row in tokenized["ids"] for t in row), dtype=np.int32)
    n = len(flat) // seq_len
    if n == 0:
        raise SparsetuneError(
            f"{what}: only {len(flat)} tokens, fewer than one sequence of data.seq_len={seq_len}; "
            "use more text or a smaller data.seq_len"
        )
    return PackedData(flat[: n * seq_len].reshape(n, seq_len))


def _load_pack(impl: str, old_module: str | None):
    if impl == "new":
        from sparsetune.data.text_datasets import pack

        return pack
    if old_module is None:
        return old_pack
    import importlib.util

    spec = importlib.util.spec_from_file_location("old_text_datasets", old_module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pack


def worker(args: argparse.Namespace) -> None:
    """What `Trainer.setup` does for data, on one rank, measured."""
    import numpy as np
    from accelerate import Accelerator

    from sparsetune.data.batches import BatchStream
    from sparsetune.data.text_datasets import load_text_splits
    from sparsetune.recipe.schema import DataSection
    from sparsetune.sources.loading import load_tokenizer

    pack = _load_pack(args.impl, args.old_module)
    accelerator = Accelerator()
    rank = accelerator.process_index
    with PeakSampler() as sampler:
        start = sampler.sample()
        tokenizer = load_tokenizer(args.tokenizer)
        cfg = DataSection(path=args.data, seq_len=args.seq_len, eval_fraction=args.eval_fraction)
        train_text, eval_text = load_text_splits(cfg)
        before = sampler.sample()
        begin = time.perf_counter()
        with accelerator.main_process_first():
            own = time.perf_counter()
            train = pack(train_text, tokenizer, cfg.text_field, cfg.seq_len, "data.path")
            held = pack(eval_text, tokenizer, cfg.text_field, cfg.seq_len, "held-out data")
            own = time.perf_counter() - own
        waited_and_packed = time.perf_counter() - begin
        stream = BatchStream(train, args.micro_batch_size, seed=0, rank=rank, world_size=accelerator.num_processes)
        digest = hashlib.sha256()
        for _ in range(args.batches):
            digest.update(stream.next_batch()["input_ids"].numpy().tobytes())
        accelerator.wait_for_everyone()
        end = sampler.sample()  # what the process keeps for training: the rows, if they are in its own memory
    result = {
        "impl": args.impl, "rank": rank, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_anon_mib": sampler.peak["RssAnon"] / MIB, "peak_file_mib": sampler.peak["RssFile"] / MIB,
        "start_rss_mib": start["VmRSS"] / MIB, "start_anon_mib": start["RssAnon"] / MIB,
        "kept_anon_mib": (end["RssAnon"] - before["RssAnon"]) / MIB,
        "pack_own_s": own, "pack_incl_wait_s": waited_and_packed,
        "train_rows": len(train), "held_rows": len(held), "train_tokens": int(len(train) * cfg.seq_len),
        "ids_type": type(train.ids).__name__, "batches_sha256": digest.hexdigest(),
    }
    if rank == 0:  # after the peaks are taken: reading every row would add the mapped file to the RSS
        result["rows_sha256"] = hashlib.sha256(np.ascontiguousarray(train.ids).tobytes()).hexdigest()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.end_training()


# -------------------------------------------------------------------------------------------------- driver


def _tokenizer_folder(name: str) -> str:
    from sparsetune.sources.loading import resolve_model_path

    kind, location = resolve_model_path(name)
    if kind != "local":
        raise SystemExit(f"--tokenizer must be a local folder or an alias (offline): {name}")
    return location


def run_impl(impl: str, args: argparse.Namespace, tokenizer_dir: str, corpus: Path, work: Path) -> list[dict]:
    """One torchrun launch of --nproc workers with empty caches; the per-rank results."""
    run = work / f"run-{impl}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    (run / "out").mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, "--worker", "--impl", impl, "--tokenizer", tokenizer_dir, "--data", str(corpus),
           "--seq-len", str(args.seq_len), "--eval-fraction", str(args.eval_fraction),
           "--micro-batch-size", str(args.micro_batch_size), "--batches", str(args.batches), "--out", str(run / "out")]
    if impl == "old" and args.old_ref:
        old = run / "old_text_datasets.py"
        old.write_text(subprocess.run(["git", "show", f"{args.old_ref}:sparsetune/data/text_datasets.py"], cwd=REPO,
                                      check=True, capture_output=True, text=True).stdout)
        cmd += ["--old-module", str(old)]
    env = dict(os.environ, SPARSETUNE_CACHE=str(run / "sparsetune-cache"), HF_DATASETS_CACHE=str(run / "hf-datasets"),
               ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    begin = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"{impl}: the {args.nproc}-process run failed (exit {proc.returncode})")
    results = [json.loads((run / "out" / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    for r in results:
        r["launch_s"] = time.perf_counter() - begin
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["old", "new", "both"], default="both")
    p.add_argument("--old-ref", help="git revision whose text_datasets.py `pack` is the old one (default: the "
                   "in-memory packing copied into this script, `old_pack`)")
    p.add_argument("--tokens", type=int, default=20_000_000, help="at least this many training tokens")
    p.add_argument("--tokenizer", default="smollm2-135m", help="a local HF folder or a sparsetune model alias")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--eval-fraction", type=float, default=0.01)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sparsetune-bench-data-memory")
    p.add_argument("--json", type=Path, help="also write all results here")
    # worker-only arguments (set by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--old-module", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from sparsetune.sources.loading import load_tokenizer

    tokenizer_dir = _tokenizer_folder(args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.tokens}-{hashlib.sha1(tokenizer_dir.encode()).hexdigest()[:8]}.jsonl"
    if not corpus.is_file():
        stats = build_corpus(corpus, tokenizer, args.tokens, args.eval_fraction)
        print(f"corpus: {corpus} ({stats['documents']} documents, {stats['chars'] / 1e6:.1f}M chars, "
              f"~{stats['estimated_tokens'] / 1e6:.1f}M tokens)", flush=True)
    impls = ["old", "new"] if args.impl == "both" else [args.impl]
    results = {impl: run_impl(impl, args, tokenizer_dir, corpus, work) for impl in impls}

    print(f"{'impl':<5} {'rank':>4} {'peak RSS MiB':>13} {'peak anon':>10} {'peak file':>10} {'kept anon':>10} "
          f"{'start RSS':>10} {'pack s':>7} {'rows':>7} {'train tokens':>13}  ids")
    for impl, ranks in results.items():
        for r in ranks:
            print(f"{impl:<5} {r['rank']:>4} {r['ru_maxrss_mib']:>13.0f} {r['peak_anon_mib']:>10.0f} "
                  f"{r['peak_file_mib']:>10.0f} {r['kept_anon_mib']:>10.0f} {r['start_rss_mib']:>10.0f} "
                  f"{r['pack_own_s']:>7.1f} {r['train_rows']:>7} {r['train_tokens']:>13,}  {r['ids_type']}")
    tokens = min(r["train_tokens"] for ranks in results.values() for r in ranks)
    if tokens < args.tokens:
        print(f"warning: the training split packed {tokens:,} tokens, under --tokens {args.tokens:,}")
    summary = []
    for impl, ranks in results.items():
        peaks = " ".join(f"r{r['rank']}={r['ru_maxrss_mib']:.0f}" for r in ranks)
        kept = " ".join(f"r{r['rank']}={r['kept_anon_mib']:.0f}" for r in ranks)
        summary.append(f"{impl}: peak RSS MiB {peaks}, kept anon MiB {kept}, pack {ranks[0]['pack_own_s']:.1f}s")
    if len(results) == 2:
        old, new = results["old"], results["new"]
        ratio = max(r["ru_maxrss_mib"] for r in old) / max(r["ru_maxrss_mib"] for r in new)
        same = all(a["batches_sha256"] == b["batches_sha256"] for a, b in zip(old, new)) and \
            old[0]["rows_sha256"] == new[0]["rows_sha256"]
        summary.append(f"old/new max peak RSS {ratio:.2f}x; rows and batches identical: {'yes' if same else 'NO'}")
    print(f"summary ({args.nproc} processes, {tokens / 1e6:.1f}M training tokens, seq_len {args.seq_len}): "
          + "; ".join(summary))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
