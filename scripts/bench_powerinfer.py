"""An export run in PowerInfer beside sparsetune, in one run: greedy tokens, perplexity with the exported
predictors, and batch-1 decode speed (sparse vs every neuron computed vs none vs PowerInfer's dense kernels).

PowerInfer is not on the package registries: build it yourself from its public source (CPU-only:
`cmake -S . -B build && cmake --build build --target main perplexity`) and pass its `build/bin` folder.

    python scripts/bench_powerinfer.py EXPORT --bin PowerInfer/build/bin [--threads 2] [--runs 5] [--json OUT]

EXPORT is `sparsetune export RUN --out EXPORT --powerinfer`. What it compares, on the same tokens (PowerInfer's own
tokenization of the held-out text, read from `main --verbose-prompt`):
  - greedy: transformers on the export (exact ReLU) vs PowerInfer with every neuron computed
    (LLAMA_SPARSE_PRED_THRESHOLD=-1e30), and sparsetune with its predicted masks vs PowerInfer with its predictors;
  - perplexity, scored as PowerInfer's `perplexity` tool scores it (chunks of --ctx tokens, the second half of each):
    PowerInfer with predictors and with every neuron, sparsetune dense / predicted masks / oracle masks, and the
    fraction of neurons the predictors skip on those tokens (computed by sparsetune with PowerInfer's formula from
    the GGUF's own tensors, which PowerInfer does not print);
  - decode tokens/s of `main` (its `eval time` line) over --runs runs each, interleaved: sparse (the export's file,
    its neurons hot-first), sparse_model_order (the same export written again in the model's own neuron order, with
    the same predictors and threshold: what the hot-first order gains), all neurons on, no neuron (the ceiling of
    skipping the FFN), and a plain GGUF of the same weights on PowerInfer's dense path (which applies SiLU: a speed
    reference only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ALL_ON, ALL_OFF = "-1e30", "1e30"


def run(cmd: list[str], env_threshold: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LLAMA_SPARSE_PRED_THRESHOLD", None)
    if env_threshold is not None:
        env["LLAMA_SPARSE_PRED_THRESHOLD"] = env_threshold
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


def pi_tokens(bin_dir: Path, gguf: Path, text_file: Path, threads: int) -> list[int]:
    proc = run([str(bin_dir / "main"), "-m", str(gguf), "-f", str(text_file), "--verbose-prompt", "-n", "0",
                "-c", "16384", "-t", str(threads)])
    ids = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+) -> '", proc.stderr + proc.stdout, re.M)]
    if not ids:
        sys.exit("error: could not read PowerInfer's prompt tokens from `main --verbose-prompt`")
    return ids


def pi_perplexity(bin_dir: Path, gguf: Path, text_file: Path, ctx: int, threads: int, threshold: str | None) -> float:
    proc = run([str(bin_dir / "perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
                "-t", str(threads)], threshold)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    if not found:
        sys.exit("error: no 'Final estimate' in PowerInfer's perplexity output")
    return float(found.group(1))


def pi_generate(bin_dir: Path, gguf: Path, prompt: str, n: int, threads: int, threshold: str | None
                ) -> tuple[str, float]:
    proc = run([str(bin_dir / "main"), "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0",
                "--repeat-penalty", "1.0", "--ignore-eos", "-t", str(threads), "-c", "1024"], threshold)
    speed = re.search(r"eval time =\s*[0-9.]+ ms /\s*\d+ runs\s*\(\s*[0-9.]+ ms per token,\s*([0-9.]+) tokens per "
                      r"second\)", proc.stderr)
    return proc.stdout, float(speed.group(1)) if speed else float("nan")


def model_order_counts(export: Path) -> list[torch.Tensor] | None:
    """The export's activation counts (activation/, in its GGUF's row order) back in the model's neuron order, through
    the recorded order (powerinfer_neuron_order.safetensors: file row r holds neuron order[r]); as they are when the
    export recorded no order (its GGUF is then in the model's order). None when the export has no activation/."""
    from sparsetune.export.powerinfer_gguf import ACTIVATION_DIR, read_neuron_order

    files = sorted((export / ACTIVATION_DIR).glob("activation_*.pt"), key=lambda f: int(f.stem.split("_")[1]))
    if not files:
        return None
    counts = [torch.load(f, weights_only=True) for f in files]
    order = read_neuron_order(export)
    if order is None:
        return counts
    return [torch.empty_like(c).index_copy_(0, o, c) for c, o in zip(counts, order)]


def write_model_order_gguf(export: Path, folder: Path, lm, tokenizer, bank) -> Path:
    """`folder/model.powerinfer.gguf`: the export's sparse file written again with neuron_order=None (the model's own
    neuron order), its predictors built as the exporter builds them (powerinfer_layers(bank, norms)), and
    `folder/activation/` in that order. `lm`: the export's plain HF Llama (ReLU MLPs). Refuses a threshold that is not
    the export's (the two files would not run the same masks)."""
    from sparsetune.export.powerinfer import powerinfer_layers
    from sparsetune.export.powerinfer_gguf import GGUF_FILE, write_activation_counts, write_gguf
    from sparsetune.surgery.structure import decoder_layers

    norms = [layer.post_attention_layernorm.weight for layer in decoder_layers(lm)]
    threshold, fc_layers = powerinfer_layers(bank, norms)
    exported = json.loads((export / "sparsity_report.json").read_text()).get("powerinfer", {}).get("sparse_threshold")
    if exported is not None and float(exported) != float(threshold):
        sys.exit(f"error: the predictors give sparse_threshold {threshold}, the export's file has {exported}")
    folder.mkdir(parents=True, exist_ok=True)
    path = write_gguf(lm, tokenizer, fc_layers, threshold, folder / GGUF_FILE, name="sparsetune model order")
    counts = model_order_counts(export)
    if counts is not None:
        write_activation_counts(counts, folder)
    return path


def ppl_like_powerinfer(model, tokens: list[int], ctx: int, masks=None) -> float:
    """PowerInfer's (llama.cpp's) perplexity: chunks of ctx tokens from a fresh context; the logits at positions
    ctx/2 .. ctx-2 score the next token. `masks`: a context (mlp_override) in which the MLPs run masked."""
    nll, count, first = 0.0, 0, ctx // 2
    with torch.no_grad(), (masks or contextlib.nullcontext()):
        for start in range(0, len(tokens) - ctx + 1, ctx):
            ids = torch.tensor([tokens[start:start + ctx]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            pos = torch.arange(first, ctx - 1)
            nll -= float(logp[pos, ids[0, pos + 1]].sum())
            count += len(pos)
    return float(torch.exp(torch.tensor(nll / count)))


def greedy(model, ids: list[int], n: int, masks=None) -> list[int]:
    seq = torch.tensor([ids])
    with torch.no_grad(), (masks or contextlib.nullcontext()):
        for _ in range(n):
            nxt = model(input_ids=seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
    return seq[0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--bin", type=Path, required=True, help="PowerInfer's build/bin (main, perplexity)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from sparsetune import load_predictors, load_sparse_model
    from sparsetune.data.text_datasets import load_text_splits
    from sparsetune.evaluation.dynamic import KeptFraction, mlp_override, oracle_mask, predicted_mask
    from sparsetune.export.powerinfer_gguf import GGUF_FILE, read_neuron_order, write_gguf
    from sparsetune.recipe.loading import read_yaml, validate_recipe

    torch.set_num_threads(args.threads)
    out, gguf = args.export, args.export / GGUF_FILE
    model = load_sparse_model(out).eval()
    bank = load_predictors(out).bind(model)
    recipe = validate_recipe(read_yaml(out / "recipe.yaml"), str(out / "recipe.yaml"))
    _, held = load_text_splits(recipe.data)
    text = "\n\n".join(held[recipe.data.text_field])[: args.ctx * args.chunks * 6]
    work = Path(tempfile.mkdtemp(prefix="bench_powerinfer_"))
    text_file = work / "held_out.txt"
    text_file.write_text(text)

    tokens = pi_tokens(args.bin, gguf, text_file, args.threads)[: args.ctx * args.chunks]
    (work / "tokens.txt").write_text(" ".join(map(str, tokens)))
    ours = {}
    tally_p, tally_o = KeptFraction(), KeptFraction()
    ours["dense"] = ppl_like_powerinfer(model, tokens, args.ctx)
    ours["predicted"] = ppl_like_powerinfer(model, tokens, args.ctx,
                                            mlp_override(model, predicted_mask(bank), tally_p))
    ours["oracle"] = ppl_like_powerinfer(model, tokens, args.ctx, mlp_override(model, oracle_mask(True, 0.3), tally_o))
    chunk_file = work / "chunks.txt"  # PowerInfer re-tokenizes the text: give it exactly these tokens' text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    chunk_file.write_text(tok.decode(tokens))
    retok = pi_tokens(args.bin, gguf, chunk_file, args.threads)
    theirs = {"predicted": pi_perplexity(args.bin, gguf, chunk_file, args.ctx, args.threads, None),
              "all_neurons": pi_perplexity(args.bin, gguf, chunk_file, args.ctx, args.threads, ALL_ON)}

    prompt_ids = tokens[:32]
    prompt = tok.decode(prompt_ids)
    hf_dense = tok.decode(greedy(model, prompt_ids, 32))
    hf_pred = tok.decode(greedy(model, prompt_ids, 32, mlp_override(model, predicted_mask(bank), KeptFraction())))
    pi_dense, _ = pi_generate(args.bin, gguf, prompt, 32, args.threads, ALL_ON)
    pi_pred, _ = pi_generate(args.bin, gguf, prompt, 32, args.threads, None)

    dense_gguf = work / "dense.gguf"
    from sparsetune.surgery.relufy import restore_hf_mlps
    from sparsetune.surgery.structure import base_causal_lm

    plain = load_sparse_model(out)
    restore_hf_mlps(base_causal_lm(plain))
    write_gguf(base_causal_lm(plain), tok, None, 0.0, dense_gguf)
    # the same sparse export in the model's own neuron order (the export's file is hot-first when it records an order)
    model_order_gguf = write_model_order_gguf(out, work / "model_order", base_causal_lm(plain), tok, bank)
    modes = {"sparse": (gguf, None), "sparse_model_order": (model_order_gguf, None), "all_neurons": (gguf, ALL_ON),
             "no_neuron": (gguf, ALL_OFF), "dense_path_silu": (dense_gguf, None)}
    speeds: dict[str, list[float]] = {mode: [] for mode in modes}
    decode_prompt = tok.decode(tokens[:16])
    for _ in range(args.runs):
        for mode, (file, thr) in modes.items():
            speeds[mode].append(pi_generate(args.bin, file, decode_prompt, args.decode_tokens, args.threads, thr)[1])

    def summary(v: list[float]) -> dict:
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}

    result = {
        "export": str(out), "threads": args.threads, "tokens": len(tokens), "ctx": args.ctx,
        "retokenized_equal": retok[: len(tokens)] == tokens,
        "perplexity": {"sparsetune": ours, "powerinfer": theirs,
                       "predicted_ratio_powerinfer_over_sparsetune": theirs["predicted"] / ours["predicted"],
                       "predicted_over_oracle_sparsetune": ours["predicted"] / ours["oracle"]},
        "skipped": {"predicted": tally_p.sparsity(), "oracle": tally_o.sparsity()},
        "greedy": {"transformers_dense": hf_dense, "powerinfer_all_neurons": pi_dense[len(prompt):] if
                   pi_dense.startswith(prompt) else pi_dense, "sparsetune_predicted": hf_pred,
                   "powerinfer_predicted": pi_pred[len(prompt):] if pi_pred.startswith(prompt) else pi_pred},
        "decode_tokens_per_s": {k: summary(v) for k, v in speeds.items()},
        "neuron_order": {"sparse": "hot-first" if read_neuron_order(out) is not None else "model order (the export "
                         "records no neuron order)", "sparse_model_order": "model order",
                         "model_order_file": str(model_order_gguf)},
    }
    g = result["greedy"]
    result["greedy"]["dense_equal"] = g["powerinfer_all_neurons"].startswith(g["transformers_dense"]) or \
        g["transformers_dense"].startswith(g["powerinfer_all_neurons"])
    result["greedy"]["predicted_equal"] = g["powerinfer_predicted"].startswith(g["sparsetune_predicted"]) or \
        g["sparsetune_predicted"].startswith(g["powerinfer_predicted"])
    d = result["decode_tokens_per_s"]
    result["speedup_sparse_over_all_neurons"] = d["sparse"]["median"] / d["all_neurons"]["median"]
    result["speedup_sparse_over_dense_path"] = d["sparse"]["median"] / d["dense_path_silu"]["median"]
    result["speedup_hot_first_over_model_order"] = d["sparse"]["median"] / d["sparse_model_order"]["median"]
    result["speedup_sparse_model_order_over_all_neurons"] = (d["sparse_model_order"]["median"]
                                                             / d["all_neurons"]["median"])
    result["ceiling_no_neuron_over_all_neurons"] = d["no_neuron"]["median"] / d["all_neurons"]["median"]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
