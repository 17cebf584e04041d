"""PowerInfer's batch-1 decode speed at Llama-2-7B's shape against the fraction of FFN neurons its predictors skip,
beside its dense path, on synthetic weights laid out the way `export --powerinfer` writes them.

    python scripts/bench_powerinfer_7b.py --bin PowerInfer/build/bin [--out runs/powerinfer_7b]
        [--skips 0,0.5,0.7,0.8,0.9,1] [--rounds 3] [--n-predict 8] [--threads 2]
        [--measured-skip 0.492 --measured-predictor-fraction 0.0891]
        [--hidden 4096 --ffn 11008 --layers 32 --heads 32 --vocab 32000] [--rank R | --predictor-fraction 0.10]
        [--cluster 1] [--generate-only]

It writes two files into --out, tensor by tensor (a block of rows at a time, so the model is never in memory), with
`write_gguf_tensors` and `llama_tensor_specs` of `sparsetune/export/powerinfer_gguf.py` (the exporter's own layout,
metadata and dtypes: F16 weights, F32 norms, F16 predictors fc1 [r, d] and fc2 [m, r], `powerinfer.sparse_threshold`
= 0), plus a synthetic 32000-token SentencePiece-style vocabulary (`tokenizer.ggml.model = llama`: <unk> <s> </s>,
the ASCII byte tokens <0x00>..<0x7F> that PowerInfer's SPM tokenizer falls back to and looks up, llama.cpp:7053-7058,
then made-up pieces; the loader needs a token list of unique tokens, llama.cpp:2482-2485, 2571). Without byte tokens
0x80-0xFF every generated text is valid UTF-8 (scripts/bench_powerinfer.py decodes `main`'s output as text), so the
prompt must be ASCII:
  - `sparse.powerinfer.gguf` (`PWRI` magic: PowerInfer's sparse FFN with the predictors);
  - `dense.gguf`, the same weights as a plain GGUF (`ffn_down` instead of `ffn_down_t`, no predictors): PowerInfer's
    dense path, the reference `scripts/bench_powerinfer.py` also measures (it applies SiLU; a speed reference only).
An existing file is reused when its header says it has this shape, rank, seed and layout version. Predictor rank:
--rank, or the largest multiple of 16 keeping the predictors within --predictor-fraction of the MLP bytes (default
10%, PowerInfer's stated budget for its predictors): 880 at Llama-2-7B's shape (9.83%, 26.6 MB per layer's 270.5 MB).

How a point's skipped fraction s is set, exactly, for every token (read in PowerInfer's source at commit d3ebd7c):
the predictor output is idx = fc2 relu(fc1 x) with x the residual stream `ffn_inp` (llama.cpp:4688-4692, 5047), and a
neuron's rows are skipped when idx < sparse_threshold (gate/up: ggml.c:14256, down: ggml.c:14427), the threshold
being the GGUF's `powerinfer.sparse_threshold` unless LLAMA_SPARSE_PRED_THRESHOLD is set (llama.cpp:2345-2350; copied
into ggml's global at llama.cpp:2975, also in CPU-only builds). Here every fc1 row is positive on every token (see
below), so relu(fc1 x) > 0, and fc2's rows are all-positive for the kept neurons and all-negative for the skipped
ones: idx >= 0 exactly on the kept set. Between points only the fc2 tensors are rewritten in place in the file (their
offsets read with gguf.GGUFReader), round((1 - s) n_ff) kept neurons per layer.

Which neurons are kept is drawn at random per layer (seeded) but spread evenly over the rows (`keep_mask`), because
the kernel cost depends on where they are: the down projection (`ggml_compute_forward_mul_mat_axpy`,
ggml.c:14390-14393, 14418) gives each thread a fixed contiguous block of n_ff / threads rows, so a contiguous kept
block would leave a thread idle; gate/up (`ggml_compute_forward_mul_mat_sparse`) hand out chunks of
n_ff / (8 threads) rows dynamically (ggml.c:14180, 14215-14217). The rows' layout also changes the cost per kept row:
measured here (1 thread, 1-layer file of Llama-2-7B's layer shape), keeping 50% of the rows scattered was slower than
keeping all of them, while 50% in runs of 64 rows cut the MLP time in half. A real model's masks are scattered, so
scattered is the default; --cluster K keeps runs of K adjacent rows (the best a neuron reordering could give).

The weights are random (uniform, seeded per tensor) with two constraints that fix which rows the kernels run, not
how fast a row runs (no kernel's cost depends on a weight's value):
  - the down axpy also skips a kept neuron whose activation relu(gate) * up is 0 in F16 (ggml.c:14422). With
    random gate rows half the kept neurons would be 0 on each token, so s would not be the skipped fraction. A
    perfect predictor keeps only active neurons; to model that, every kept neuron is made active on every token:
  - `attn_output` and `ffn_down(_t)` are 0, so the residual stream is the token's embedding at every layer;
  - the embedding's column 0 is 1 and its other columns lie in [-u, u], u = 0.5 / sqrt(d), and the rows of
    ffn_gate, ffn_up and fc1 have 1 in column 0 and [-u, u] elsewhere, so by Cauchy-Schwarz each row's dot product
    with the (normalized or raw) residual is 1 +- 0.25 times a positive scale: positive for every token, neuron and
    layer (`activation_bounds` computes the bounds, including F16 rounding, and asserts they stay within F16).
The same weights (seed) go into both files, and the dense path's cost does not depend on values either.
Random Q/K rows are not permuted (a permutation of random rows is random rows).

Decode speed: PowerInfer's `main` (via `pi_generate` of scripts/bench_powerinfer.py: greedy, --ignore-eos, `eval
time` tokens/s), batch 1, --threads threads, --n-predict tokens, every point and the dense path once per round,
interleaved over --rounds rounds (dense first, then the points, ascending in even rounds and descending in odd
ones); the median and the range over the rounds are reported. Writes results.json and results.md into --out
(results_clusterK.* with --cluster K).

Projection (--measured-skip s*, --measured-predictor-fraction p*, defaults: the SmolLM2-135M export measured in
docs/ENGINES.md, 49.2% skipped, predictors 14.2 MB beside 159 MB of MLP weights = 0.0891): the median time per token
t(s) = 1 / (tokens/s) is interpolated linearly in s between the two measured points around s* (time, not tokens/s,
since the FFN work is proportional to the kept fraction 1 - s); the predictors' cost is then moved from this file's
predictor fraction p_b (predictor bytes / MLP bytes, read from the header) to p* by (p* - p_b) x T_mlp, T_mlp being
the MLP's time per token at 0% skipped: t(0) - t(1) when both 0% and 100% skipped are measured (the default points),
otherwise minus the slope of a least-squares line t = a - T_mlp s through the points (predictor and MLP weights are
both F16 read once per token, so their time per byte is assumed equal). Speed-up = t(dense path) / projected t.
The 100% point (no FFN row computed, predictors still run) is the ceiling of skipping; --skips can drop it.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import string
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SPARSE_FILE, DENSE_FILE = "sparse.powerinfer.gguf", "dense.gguf"
LAYOUT = "sparsetune-bench-powerinfer-7b-v2"  # bump when the weights' construction changes
KEY_LAYOUT, KEY_SEED, KEY_RANK = "sparsetune.bench.layout", "sparsetune.bench.seed", "sparsetune.bench.rank"
BLOCK_ROWS = 1024  # rows generated and written at a time (16 MiB of F32 at d = 4096)
N_FIXED_TOKENS = 3 + 128  # <unk> <s> </s> and the ASCII byte tokens
SPARSE_KERNEL_MIN_FF = 1001  # ggml.c:14904: n_ff <= 1000 runs a different kernel (128-row head blocks)
F16_MAX = 65504.0
F16_EPS = 2.0 ** -10  # relative spacing of F16 (rounding error <= half of it)
MEASURED_SKIP = 0.492  # docs/ENGINES.md: the SmolLM2-135M export's predictors skip 49.2% of neurons in PowerInfer
MEASURED_PREDICTOR_FRACTION = 14_192_640 / 159_252_480  # its F16 predictors / its MLP weights, in bytes


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    ffn: int = 11008
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    vocab: int = 32000
    context: int = 4096
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def check(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads or (self.hidden // self.heads) % 2:
            sys.exit("error: --hidden must be a multiple of --heads with an even head size, --heads of --kv-heads")
        if self.hidden % 8:  # the AVX2 axpy runs over 8 floats at a time with no tail (ggml.c:14297)
            sys.exit("error: --hidden must be a multiple of 8 (PowerInfer's F16 axpy kernel)")
        if self.ffn < SPARSE_KERNEL_MIN_FF:
            sys.exit("error: --ffn must be > 1000: below that PowerInfer runs its 128-row block kernel instead of "
                     "the neuron-sparse one (ggml.c:14904)")
        if self.vocab < N_FIXED_TOKENS + 64:
            sys.exit("error: --vocab must hold at least the 3 special tokens, 128 byte tokens and 64 pieces")


def predictor_rank(shape: Shape, fraction: float) -> int:
    """The largest multiple of 16 whose predictors (r (d + m) values per layer) stay within `fraction` of the MLP's
    3 d m values: PowerInfer keeps predictors at <= 10% of the model (its paper, /work/shared/RESEARCH.md)."""
    r = int(fraction * 3 * shape.hidden * shape.ffn / (shape.hidden + shape.ffn)) // 16 * 16
    return max(r, 16)


def u_rest(shape: Shape) -> float:
    return 0.5 / np.sqrt(shape.hidden)


def activation_bounds(shape: Shape) -> dict:
    """Worst-case bounds over every token, layer and neuron for this file's construction (module docstring), from
    Cauchy-Schwarz with the F16 values' extra rounding: the residual x = embedding row (x_0 = 1, ||x_rest|| <= X),
    a gate/up/fc1 row w (w_0 = 1, ||w_rest|| <= W). w . x in [1 - W X - e, 1 + W X + e], e covering ggml's F16
    rounding of its input (ggml.c:430-439) and F32 accumulation; gate and up see x / rms(x) (RMSNorm with weight 1)."""
    d = shape.hidden
    u = u_rest(shape) * (1 + F16_EPS)  # an F16-rounded value of [-u, u] is within u (1 + 2^-11)
    x_rest = w_rest = u * np.sqrt(d - 1)
    cross = w_rest * x_rest
    rounding = np.sqrt(1 + w_rest ** 2) * np.sqrt(1 + x_rest ** 2) * (F16_EPS + d * 2.0 ** -23)
    lo, hi = 1 - cross - rounding, 1 + cross + rounding
    rms_lo = np.sqrt(1 / d + shape.rms_eps)
    rms_hi = np.sqrt((1 + x_rest ** 2) / d + shape.rms_eps)
    out = {"fc1_min": lo, "fc1_max": hi, "gate_min": lo / rms_hi, "gate_max": hi / rms_lo,
           "activation_min": (lo / rms_hi) ** 2, "activation_max": (hi / rms_lo) ** 2}
    if not (lo > 0.5 and out["activation_min"] > 1e-3 and out["activation_max"] < F16_MAX / 4):
        raise AssertionError(f"the construction does not keep every kept neuron active within F16: {out}")
    return out


def synthetic_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the ASCII byte tokens <0x00>..<0x7F>, then unique made-up pieces ("▁" marks a word
    start)."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(128)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 128
    seen = set(tokens)
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation

    def pieces():
        yield "▁"
        yield from chars
        for length in itertools.count(1):
            for combo in itertools.product(string.ascii_lowercase, repeat=length):
                yield "▁" + "".join(combo)
                if length > 1:
                    yield "".join(combo)

    for piece in pieces():
        if len(tokens) == n:
            break
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * N_FIXED_TOKENS + [-float(i) for i in range(n - N_FIXED_TOKENS)]
    return tokens, scores, [int(t) for t in types]


def metadata(shape: Shape, rank: int | None, seed: int):
    from sparsetune.export.powerinfer_gguf import add_llama_metadata

    def add(writer) -> None:
        add_llama_metadata(writer, name="sparsetune bench_powerinfer_7b (synthetic)", context_length=shape.context,
                           n_embd=shape.hidden, n_layer=shape.layers, n_ff=shape.ffn, n_head=shape.heads,
                           n_head_kv=shape.kv_heads, rms_eps=shape.rms_eps, rope_theta=shape.rope_theta,
                           sparse_threshold=0.0 if rank is not None else None)
        tokens, scores, types = synthetic_vocab(shape.vocab)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_string(KEY_LAYOUT, LAYOUT)
        writer.add_uint32(KEY_SEED, seed)
        writer.add_uint32(KEY_RANK, rank or 0)

    return add


def _rng(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng([seed] + [zlib.crc32(str(p).encode()) for p in parts])


def tensor_blocks(name: str, shape: tuple[int, ...], dtype: np.dtype, geometry: Shape, seed: int):
    """The row blocks of one tensor, generated on the fly (module docstring: what each tensor holds)."""
    kind = name.split(".")[-2]
    if len(shape) == 1:  # norms
        yield np.ones(shape, dtype)
        return
    if kind == "fc2":  # rewritten per point (`write_fc2`); written here with every neuron kept
        yield fc2_values(shape, np.ones(shape[0], bool), int(name.split(".")[1]), seed).astype(dtype)
        return
    rng = _rng(seed, name)
    u = u_rest(geometry)
    for start in range(0, shape[0], BLOCK_ROWS):
        rows = min(BLOCK_ROWS, shape[0] - start)
        if kind in ("attn_output", "ffn_down", "ffn_down_t"):
            yield np.zeros((rows, shape[1]), dtype)
            continue
        block = rng.random((rows, shape[1]), dtype=np.float32)
        if kind in ("token_embd", "ffn_gate", "ffn_up", "fc1"):
            block = (block - 0.5) * (2 * u)
            block[:, 0] = 1.0
        else:  # attn_q/k/v, output: std 0.02
            block = (block - 0.5) * (2 * 0.02 * np.sqrt(3))
        yield block.astype(dtype)


def fc2_values(shape: tuple[int, int], keep: np.ndarray, layer: int, seed: int) -> np.ndarray:
    """fc2 [n_ff, r]: magnitudes in [0.5, 1.5] / r (fixed per layer), row sign + for kept neurons, - for skipped."""
    mags = _rng(seed, "fc2", layer).uniform(0.5, 1.5, shape).astype(np.float32) / shape[1]
    return (mags * np.where(keep, 1.0, -1.0).astype(np.float32)[:, None]).astype(np.float16)


def keep_mask(n_ff: int, skip: float, layer: int, seed: int, cluster: int = 1) -> np.ndarray:
    """Exactly k = round((1 - skip) n_ff) kept neurons spread evenly over the rows (module docstring: why), in runs
    of `cluster` adjacent rows: the rows are cut into units of `cluster` rows, the units into ceil(k / cluster) strata,
    and one unit is drawn at random in each stratum; then the last kept rows are dropped (or the first unkept rows
    added) until exactly k are kept. Every thread's block of rows thus holds its share to within about a unit. (A plain
    random subset would leave one thread ~sqrt(k) rows more than the other: ~3% of the down projection's rows at 90%
    skipped at n_ff 11008.) `cluster` 1: scattered neurons, as a real model's masks are; larger: the contiguous runs a
    neuron reordering could at best give PowerInfer's kernels."""
    k = round((1 - skip) * n_ff)
    keep = np.zeros(n_ff, bool)
    if k == 0:
        return keep
    units = -(-n_ff // cluster)
    need = min(units, -(-k // cluster))
    edges = (np.arange(need + 1) * units) // need
    rng = _rng(seed, "keep", layer, round(skip * 1e6), *([cluster] if cluster > 1 else []))
    for unit in edges[:-1] + (rng.random(need) * (edges[1:] - edges[:-1])).astype(np.int64):
        keep[unit * cluster:(unit + 1) * cluster] = True
    extra = int(keep.sum()) - k
    if extra > 0:
        keep[np.flatnonzero(keep)[-extra:]] = False
    elif extra < 0:
        keep[np.flatnonzero(~keep)[:-extra]] = True
    return keep


def file_specs(shape: Shape, rank: int | None):
    from sparsetune.export.powerinfer_gguf import llama_tensor_specs

    return llama_tensor_specs(shape.vocab, shape.hidden, shape.layers, shape.ffn, shape.kv_dim, rank)


def field_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value.tolist()[0]


@dataclass
class FileIndex:
    """What the header of a written file says, read once with gguf.GGUFReader (parsing the 32000-token vocabulary
    takes seconds): every tensor's absolute data offset, numpy shape and type, and the keys checked here."""
    path: Path
    tensors: dict[str, tuple[int, tuple[int, ...], str]]
    fields: dict
    n_tokens: int

    @classmethod
    def read(cls, path: Path) -> FileIndex:
        from sparsetune.export.powerinfer_gguf import open_gguf

        reader = open_gguf(path)
        tensors = {t.name: (int(t.data_offset), tuple(int(x) for x in reversed(t.shape.tolist())),
                            t.tensor_type.name) for t in reader.tensors}
        keys = (KEY_LAYOUT, KEY_SEED, KEY_RANK, "llama.attention.head_count", "llama.attention.head_count_kv",
                "powerinfer.sparse_threshold")
        fields = {k: field_value(reader, k) for k in keys}
        n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
        del reader
        return cls(Path(path), tensors, fields, n_tokens)

    def array(self, name: str, mode: str = "r") -> np.ndarray:
        offset, shape, kind = self.tensors[name]
        return np.memmap(self.path, dtype=np.float16 if kind == "F16" else np.float32, mode=mode, offset=offset,
                         shape=shape)

    def end(self) -> int:
        return max((off + int(np.prod(shape)) * (2 if kind == "F16" else 4) for off, shape, kind in
                    self.tensors.values()), default=0)


def matches(path: Path, shape: Shape, rank: int | None, seed: int) -> bool:
    """Whether `path` is a complete file of this construction (header fields, tensor list, size)."""
    try:
        index = FileIndex.read(path)
    except (OSError, ValueError, KeyError):
        return False
    want = {n: (s, "F16" if dt == np.float16 else "F32") for n, s, dt in file_specs(shape, rank)}
    have = {n: (s, kind) for n, (_, s, kind) in index.tensors.items()}
    f = index.fields
    return (f[KEY_LAYOUT] == LAYOUT and f[KEY_SEED] == seed and f[KEY_RANK] == (rank or 0)
            and f["llama.attention.head_count"] == shape.heads
            and f["llama.attention.head_count_kv"] == shape.kv_heads and index.n_tokens == shape.vocab
            and list(have.items()) == list(want.items()) and path.stat().st_size >= index.end())


def write_file(path: Path, shape: Shape, rank: int | None, seed: int) -> float:
    """Write the file (to PATH.partial, renamed when complete); returns the seconds it took."""
    from sparsetune.export.powerinfer_gguf import write_gguf_tensors

    specs = file_specs(shape, rank)
    partial = path.with_name(path.name + ".partial")
    start = time.perf_counter()
    write_gguf_tensors(partial, metadata(shape, rank, seed), specs,
                       (tensor_blocks(n, s, dt, shape, seed) for n, s, dt in specs), sparse=rank is not None)
    os.replace(partial, path)
    return time.perf_counter() - start


def file_bytes(shape: Shape, rank: int | None) -> int:
    return sum(int(np.prod(s)) * np.dtype(dt).itemsize for _, s, dt in file_specs(shape, rank))


def write_fc2(index: FileIndex, shape: Shape, skip: float, seed: int, cluster: int = 1) -> dict[int, int]:
    """Rewrite every layer's fc2 in place in the sparse file for `skip`; returns layer -> kept neurons."""
    kept = {}
    with open(index.path, "r+b") as f:
        for layer in range(shape.layers):
            offset, fshape, kind = index.tensors[f"blk.{layer}.fc2.weight"]
            assert kind == "F16"
            keep = keep_mask(shape.ffn, skip, layer, seed, cluster)
            f.seek(offset)
            f.write(fc2_values(fshape, keep, layer, seed).reshape(-1).view(np.uint8))
            kept[layer] = int(keep.sum())
    return kept


def engine_kept(index: FileIndex, shape: Shape, tokens: list[int]) -> np.ndarray:
    """[layer, token] -> neurons PowerInfer's rule keeps, from the file's own tensors and computed as ggml does for
    F16 weights: the input rounded to F16, F32 sums (ggml.c:430-439), relu, rounded to F16 again for fc2, kept when
    idx >= powerinfer.sparse_threshold (ggml.c:14256, 14427). The residual is the token's embedding (module
    docstring)."""
    threshold = float(index.fields["powerinfer.sparse_threshold"])
    x = np.asarray(index.array("token_embd.weight")[tokens], np.float32)  # F16 values: exact in F32
    out = np.zeros((shape.layers, len(tokens)), np.int64)
    for layer in range(shape.layers):
        fc1 = np.asarray(index.array(f"blk.{layer}.fc1.weight"), np.float32)
        fc2 = np.asarray(index.array(f"blk.{layer}.fc2.weight"), np.float32)
        hidden = np.maximum(x @ fc1.T, 0).astype(np.float16).astype(np.float32)
        out[layer] = ((hidden @ fc2.T) >= threshold).sum(1)
    return out


def load_bench_powerinfer():
    """scripts/bench_powerinfer.py as a module (its PowerInfer runner and timing parser)."""
    path = Path(__file__).with_name("bench_powerinfer.py")
    spec = importlib.util.spec_from_file_location("bench_powerinfer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs visible"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs visible ({os.uname().machine})"


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def project(skips: list[float], ms: list[float], dense_ms: float, predictor_fraction: float, skip_star: float,
            fraction_star: float) -> dict:
    """The projection described in the module docstring."""
    order = np.argsort(skips)
    s, t = np.asarray(skips, float)[order], np.asarray(ms, float)[order]
    if s[0] == 0 and s[-1] == 1:
        t_mlp, how = float(t[0] - t[-1]), "0% minus 100% skipped"
    else:
        t_mlp, how = -float(np.polyfit(s, t, 1)[0]), "a least-squares line through the points"
    inside = s[0] <= skip_star <= s[-1]
    if inside:
        t_star = float(np.interp(skip_star, s, t))
        j = int(np.searchsorted(s, skip_star))
        between = [float(s[max(j - 1, 0)]), float(s[min(j, len(s) - 1)])]
    else:  # extrapolate the nearest segment
        i = 0 if skip_star < s[0] else len(s) - 2
        t_star = float(t[i] + (t[i + 1] - t[i]) * (skip_star - s[i]) / (s[i + 1] - s[i]))
        between = [float(s[i]), float(s[i + 1])]
    t_proj = t_star + (fraction_star - predictor_fraction) * t_mlp
    return {"measured_skip": skip_star, "measured_predictor_fraction": fraction_star,
            "bench_predictor_fraction": predictor_fraction, "interpolated_between": between, "extrapolated": not inside,
            "ms_per_token_at_skip": t_star, "mlp_ms_per_token_at_0": t_mlp, "mlp_ms_from": how,
            "projected_ms_per_token": t_proj, "projected_tokens_per_s": 1000 / t_proj,
            "speedup_over_dense_path": dense_ms / t_proj}


def markdown(result: dict) -> str:
    lines = [f"# PowerInfer decode speed at {result['shape_name']}", "",
             f"{result['device']}; PowerInfer `main`, {result['threads']} threads, batch 1, {result['n_predict']} "
             f"tokens per run, {result['rounds']} interleaved rounds; predictor rank {result['rank']} "
             f"({result['predictor_fraction'] * 100:.1f}% of the MLP bytes), F16; kept neurons "
             + ("scattered over the rows" if result["cluster"] == 1 else f"in runs of {result['cluster']} rows")
             + f". Load average {result['load_average_before_after'][0]:.2f} before the runs, "
             f"{result['load_average_before_after'][1]:.2f} after.", "",
             "| skipped fraction | decode tokens/s (median, range) | speed-up over the dense path | over 0% skipped |",
             "| --- | --- | --- | --- |"]
    for row in result["table"]:
        lines.append(f"| {row['label']} | {row['median']:.2f} ({row['min']:.2f}-{row['max']:.2f}) | "
                     f"{row['speedup_over_dense_path']:.2f}x | "
                     + (f"{row['speedup_over_skip_0']:.2f}x |" if row["speedup_over_skip_0"] is not None else "- |"))
    p = result.get("projection")
    if p:
        lines += ["", projection_line(p)]
    return "\n".join(lines) + "\n"


def projection_line(p: dict) -> str:
    return (f"Projection at {p['measured_skip'] * 100:.1f}% skipped with predictors of "
            f"{p['measured_predictor_fraction'] * 100:.2f}% of the MLP bytes: {p['projected_tokens_per_s']:.2f} "
            f"tokens/s, **{p['speedup_over_dense_path']:.2f}x** over the dense path (time per token "
            f"{'extrapolated' if p['extrapolated'] else 'interpolated'} linearly between the points at "
            f"{p['interpolated_between'][0] * 100:.0f}% and {p['interpolated_between'][1] * 100:.0f}%: "
            f"{p['ms_per_token_at_skip']:.2f} ms; predictor cost moved from this file's "
            f"{p['bench_predictor_fraction'] * 100:.2f}% by (p* - p_b) x T_mlp, T_mlp = "
            f"{p['mlp_ms_per_token_at_0']:.2f} ms, the MLP's time at 0% from {p['mlp_ms_from']}: "
            f"{p['projected_ms_per_token']:.2f} ms per token).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, help="PowerInfer's build/bin (main); required unless --generate-only")
    ap.add_argument("--out", type=Path, default=Path("runs/powerinfer_7b"))
    ap.add_argument("--skips", default="0,0.5,0.7,0.8,0.9,1", help="skipped fractions, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-predict", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="Once upon a time")  # short: its (dense) prompt eval is not timed
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cluster", type=int, default=1,
                    help="kept neurons come in runs of this many adjacent rows (1: scattered, as in a real model)")
    default = Shape()
    ap.add_argument("--hidden", type=int, default=default.hidden)
    ap.add_argument("--ffn", type=int, default=default.ffn)
    ap.add_argument("--layers", type=int, default=default.layers)
    ap.add_argument("--heads", type=int, default=default.heads)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (Llama-2-7B has no GQA)")
    ap.add_argument("--vocab", type=int, default=default.vocab)
    ap.add_argument("--rank", type=int, default=None, help="predictor rank (default: from --predictor-fraction)")
    ap.add_argument("--predictor-fraction", type=float, default=0.10,
                    help="predictor bytes / MLP bytes the default rank stays within (PowerInfer: <= 10%%)")
    ap.add_argument("--measured-skip", type=float, default=MEASURED_SKIP)
    ap.add_argument("--measured-predictor-fraction", type=float, default=MEASURED_PREDICTOR_FRACTION)
    ap.add_argument("--generate-only", action="store_true", help="write (or check) the files, verify, do not run")
    args = ap.parse_args()
    if not args.prompt.isascii():
        sys.exit("error: --prompt must be ASCII (the synthetic vocabulary has byte tokens for ASCII only)")

    from sparsetune.export.powerinfer_gguf import tensor_bytes

    shape = Shape(args.hidden, args.ffn, args.layers, args.heads, args.kv_heads or args.heads, args.vocab)
    shape.check()
    skips = sorted({float(x) for x in args.skips.split(",")})
    if any(not 0 <= s <= 1 for s in skips):
        sys.exit("error: --skips must lie in [0, 1]")
    rank = args.rank or predictor_rank(shape, args.predictor_fraction)
    bounds = activation_bounds(shape)
    if not args.generate_only and (args.bin is None or not (args.bin / "main").exists()):
        sys.exit("error: --bin must be PowerInfer's build/bin holding `main` (or pass --generate-only)")
    args.out.mkdir(parents=True, exist_ok=True)
    sparse_path, dense_path = args.out / SPARSE_FILE, args.out / DENSE_FILE
    files = ((sparse_path, rank), (dense_path, None))
    reuse = {p: p.exists() and matches(p, shape, r, args.seed) for p, r in files}
    for path, _ in files:
        if path.exists() and not reuse[path]:
            print(f"{path}: another shape, rank, seed or layout: replaced", flush=True)
            path.unlink()
    need = sum(file_bytes(shape, r) for p, r in files if not reuse[p])
    free = shutil.disk_usage(args.out).free
    if need > free:
        sys.exit(f"error: the files need {need / 1e9:.2f} GB more and {args.out} has {free / 1e9:.2f} GB free")

    written = {}
    for path, r in files:
        seconds = 0.0 if reuse[path] else write_file(path, shape, r, args.seed)
        written[path.name] = {"bytes": path.stat().st_size, "write_s": round(seconds, 1), "reused": reuse[path]}
        print(f"{path}: {path.stat().st_size / 1e9:.3f} GB, "
              + ("reused" if reuse[path] else f"written in {seconds:.0f} s"), flush=True)
    sizes = tensor_bytes(sparse_path)
    predictor_fraction = sizes["predictor_bytes"] / sizes["mlp_bytes"]
    print(f"predictor rank {rank}: {sizes['predictor_bytes'] / 1e6:.1f} MB of predictors beside "
          f"{sizes['mlp_bytes'] / 1e6:.1f} MB of MLP weights ({predictor_fraction * 100:.2f}%)", flush=True)

    # every point's fc2 once: the predictors select exactly the requested count on sampled tokens, every layer
    probe = [int(t) for t in _rng(args.seed, "probe").choice(shape.vocab, size=min(8, shape.vocab), replace=False)]
    checks = {}
    index = FileIndex.read(sparse_path)
    for s in skips:
        kept = write_fc2(index, shape, s, args.seed, args.cluster)
        seen = engine_kept(index, shape, probe)
        want = np.array([kept[layer] for layer in range(shape.layers)])[:, None]
        if not (seen == want).all():
            sys.exit(f"error: at skipped fraction {s} PowerInfer's rule keeps {seen.min()}-{seen.max()} neurons, "
                     f"expected {want.min()}-{want.max()}")
        checks[str(s)] = {"kept_per_layer": int(want[0, 0]), "skipped_exactly": 1 - float(want[0, 0]) / shape.ffn}
    print("predictor rule checked at every point on", len(probe), "tokens x", shape.layers, "layers", flush=True)
    if args.generate_only:
        return

    bench = load_bench_powerinfer()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:  # ggml's worker threads spin-wait: a competing process stalls every step
        print(f"warning: load average {load_before[0]:.2f} before the runs: other processes compete for the cores, "
              "and with --threads > 1 ggml's spin-waiting threads then make timings unreliable", flush=True)
    speeds: dict[str, list[float]] = {"dense_path": [], **{str(s): [] for s in skips}}
    walls: dict[str, list[float]] = {k: [] for k in speeds}
    for rnd in range(args.rounds):
        order = skips if rnd % 2 == 0 else skips[::-1]
        for label in ["dense_path"] + [str(s) for s in order]:
            if label == "dense_path":
                path = dense_path
            else:
                write_fc2(index, shape, float(label), args.seed, args.cluster)
                path = sparse_path
            start = time.perf_counter()
            _, tps = bench.pi_generate(args.bin, path, args.prompt, args.n_predict, args.threads, None)
            walls[label].append(round(time.perf_counter() - start, 2))
            if not np.isfinite(tps):
                sys.exit(f"error: no `eval time` line in PowerInfer's output for {label}")
            speeds[label].append(tps)
            print(f"round {rnd + 1}/{args.rounds} {label:>10}: {tps:8.2f} tokens/s ({walls[label][-1]:.1f} s)",
                  flush=True)

    stats = {k: summary(v) for k, v in speeds.items()}
    dense_tps = stats["dense_path"]["median"]
    zero = stats.get(str(skips[0]))["median"] if skips[0] == 0 else None
    table = [{"label": "dense path (plain GGUF)", "skip": None, **stats["dense_path"],
              "speedup_over_dense_path": 1.0, "speedup_over_skip_0": None}]
    for s in skips:
        st = stats[str(s)]
        table.append({"label": f"{s * 100:.0f}%", "skip": s, **st,
                      "speedup_over_dense_path": st["median"] / dense_tps,
                      "speedup_over_skip_0": st["median"] / zero if zero else None})
    result = {
        "shape_name": "Llama-2-7B's shape" if shape == Shape() else "a small shape", "shape": asdict(shape),
        "rank": rank, "predictor_fraction": predictor_fraction, "tensor_bytes": sizes, "files": written,
        "device": cpu_name(), "threads": args.threads,
        "n_predict": args.n_predict, "rounds": args.rounds, "prompt": args.prompt, "seed": args.seed,
        "cluster": args.cluster, "layout": LAYOUT,
        "activation_bounds": bounds, "predictor_checks": checks, "table": table, "wall_s": walls,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
    }
    if len(skips) > 1:
        ms = [1000 / stats[str(s)]["median"] for s in skips]
        result["projection"] = project(skips, ms, 1000 / dense_tps, predictor_fraction, args.measured_skip,
                                       args.measured_predictor_fraction)
    stem = "results" if args.cluster == 1 else f"results_cluster{args.cluster}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (args.out / f"{stem}.md").write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
