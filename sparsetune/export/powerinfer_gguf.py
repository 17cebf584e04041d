"""`export --powerinfer`: one GGUF file PowerInfer's binaries run as they are (`main`, `perplexity`), written with
the `gguf` package, plus the per-layer neuron activation counts its GPU/CPU solver reads.

Every name, shape, dtype and key below comes from PowerInfer's public source at commit d3ebd7c (SJTU-IPADS/PowerInfer):
  - `ggml.c:19481-19484` (gguf_init_from_file): a file whose magic is `PWRI` instead of `GGUF` selects sparse
    inference (`GGML_SPARSE_INFERENCE`); the rest is GGUF v2/v3 (`ggml.c:19508`: v1 refused).
  - `llama.cpp:3236-3264` (llm_load_sparse_model_tensors, LLM_ARCH_LLAMA): `token_embd` {n_embd, n_vocab},
    `output_norm` {n_embd}, `output` {n_embd, n_vocab} (required even for tied embeddings), per layer `attn_norm`,
    `attn_q` {n_embd, n_embd}, `attn_k`/`attn_v` {n_embd, n_embd_gqa}, `attn_output`, `ffn_norm`, `ffn_gate` and
    `ffn_up` {n_embd, n_ff}, `ffn_down_t` {n_embd, n_ff} (the down projection transposed), `fc1` {n_embd, r},
    `fc2` {r, n_ff}; `llama.cpp:2111`: the file must hold exactly these tensors (ggml dims are numpy's reversed).
  - `ggml.c:14314-14440` (mul_mat_axpy): `ffn_down_t` is read as F16, so 2-D model weights are F16 (as PowerInfer's
    own converter writes them, `convert-hf-to-powerinfer-gguf.py:397-410`); 1-D norms stay F32.
  - Predictors: the loader checks only their names and shapes, not their type (`llama.cpp:3263-3264` with the
    wildcard rank; `create_tensor`, `llama.cpp:2076-2107`, compares `ne` only), and the graph runs them through
    the generic `ggml_mul_mat` (`llama.cpp:4688-4692`), which takes F32, F16 or quantized weights. Both of
    PowerInfer's converters write them F16 by default (`convert-hf-to-powerinfer-gguf.py:403-410`, `--outtype`
    default f16 at 621; `convert.py:124-129, 997-999`, default f16 at 1200) and its quantizer makes them Q4_0/Q5_0
    (`llama.cpp:9096-9099`). So they are written F16 here by default (half the bytes of F32). ggml then also rounds
    the predictor's input (the residual) and its hidden ReLU output to F16 before the dot products (`ggml.c:430-439`:
    F16's vec_dot_type is F16; `ggml.c:9703-9715`), summing in F32: PowerInfer's masks can differ from sparsetune's
    F32 ones on neurons within F16 rounding of the threshold (`engine_mask` computes them the engine's way).
    `predictor_dtype="f32"` writes them F32 (exactly sparsetune's masks on the same residual stream).
  - `llama.cpp:5028-5050` (build_llama): the sparse FFN is relu(gate) * up (LLM_FFN_RELU, LLM_FFN_PAR, no biases)
    and its predictor reads `ffn_inp`, the residual stream before `ffn_norm`: idx = fc2 @ relu(fc1 @ ffn_inp)
    (`llama.cpp:4688-4692`); `ggml.c:14256, 14427`: a neuron is skipped when idx < sparse_threshold.
  - `llama.cpp:362, 2345-2350`: the threshold is the f32 key `powerinfer.sparse_threshold`.
  - `llama.cpp:327-347, 2356`: `llama.context_length`, `.embedding_length`, `.block_count`,
    `.feed_forward_length`, `.rope.dimension_count`, `.attention.head_count(_kv)`,
    `.attention.layer_norm_rms_epsilon` (required), `.rope.freq_base`, `.rope.scaling.type/factor`.
  - The Q/K rows are permuted from Hugging Face's rotate-half layout to the interleaved pairs ggml's rope mode 0
    rotates (PowerInfer's `convert.py` `permute`).
  - `llama.cpp:3101-3110` and `powerinfer-py/powerinfer/solver.py:22`: the GPU split solver reads
    `<folder of the GGUF>/activation/activation_{i}.pt`, one 1-D tensor of n_ff activation counts per layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from sparsetune.activations import build_activation
from sparsetune.errors import SparsetuneError

GGUF_FILE = "model.powerinfer.gguf"
PREDICTOR_DTYPES = ("f16", "f32")
F16_MAX = float(np.finfo(np.float16).max)
ACTIVATION_DIR = "activation"
POWERINFER_MAGIC = b"PWRI"
# model types whose llama.cpp architecture is "llama" with no attention or MLP biases
LLAMA_TYPES = ("llama", "mistral")


def check_model(config) -> None:
    """Refuse (one line) a model PowerInfer's llama path would run differently from transformers."""
    kind = config.model_type
    if kind not in LLAMA_TYPES:
        raise SparsetuneError(f"--powerinfer: model type {kind!r} is not run by PowerInfer's llama path "
                              f"(supported here: {', '.join(LLAMA_TYPES)})")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise SparsetuneError("--powerinfer: this model has attention or MLP biases, which PowerInfer's llama path "
                              "does not load")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise SparsetuneError("--powerinfer: head_dim x num_attention_heads != hidden_size, which PowerInfer's "
                              "llama loader refuses (llama.cpp: invalid n_rot)")
    rope = rope_settings(config)
    if rope["type"] not in ("default", "linear"):
        raise SparsetuneError(f"--powerinfer: RoPE scaling {rope['type']!r} is not implemented by PowerInfer "
                              "(default and linear only)")


def check_activation(spec: dict) -> None:
    """PowerInfer's sparse llama FFN computes relu(gate) * up and nothing else (llama.cpp:5050)."""
    name = spec["activation"]
    why = build_activation(spec).powerinfer_refusal  # the activation says why, or None when it runs
    if why is not None:
        raise SparsetuneError(f"--powerinfer: activation {name!r} cannot run truthfully in PowerInfer's llama path "
                              f"({why}); export a relu run, or export without --powerinfer")


def rope_settings(config) -> dict:
    """RoPE base and scaling from transformers 5's `rope_parameters` (or the older top-level keys)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise SparsetuneError("--powerinfer: the model config names no RoPE base (rope_parameters.rope_theta)")
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor"))
    return {"theta": float(theta), "type": kind, "factor": None if factor is None else float(factor)}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q/k_proj from rotate-half (i, i + d/2) pairs to the interleaved (2i, 2i + 1) pairs of ggml's rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(writer, tokenizer, vocab_size: int) -> None:
    """The byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`), its merges and special token ids."""
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data.get("model", {}).get("type") != "BPE":
        raise SparsetuneError("--powerinfer: only byte-level BPE tokenizers are written (this one is "
                              f"{data.get('model', {}).get('type')})")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in added and added[token].special
                         else gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


def write_gguf(lm, tokenizer, fc_layers: list[dict[str, torch.Tensor]] | None, threshold: float, path: Path,
               name: str = "sparsetune export", predictor_dtype: str = "f16") -> Path:
    """Write `lm` (a plain HF Llama with ReLU MLPs), its tokenizer and the PowerInfer predictor tensors
    (`fc1.weight` [r, d], `fc2.weight` [m, r] per layer, for idx = fc2 relu(fc1 residual) >= threshold).
    `fc_layers=None` writes a plain GGUF of the same weights for PowerInfer's dense path instead (`GGUF` magic,
    `ffn_down`, no predictors; llama.cpp:3423): that path applies SiLU, so it is a speed reference only.
    `predictor_dtype`: "f16" (PowerInfer's converters' default; a predictor tensor whose values F16 cannot hold is
    written F32) or "f32". A failed write removes the partial file and raises the OS's own error (ENOSPC: "No space
    left on device")."""
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise ValueError(f"predictor_dtype must be one of {PREDICTOR_DTYPES}, got {predictor_dtype!r}")
    sparse = fc_layers is not None
    import gguf

    path = Path(path)
    cfg = lm.config
    check_model(cfg)
    rope = rope_settings(cfg)
    state = {k: v.detach().float().cpu() for k, v in lm.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_rope_dimension_count(int(cfg.hidden_size // n_head))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if sparse:
        writer.add_float32("powerinfer.sparse_threshold", float(threshold))
    _vocab(writer, tokenizer, int(cfg.vocab_size))

    arrays: list[np.ndarray] = []  # in the order of the tensor infos; written below with Python's own writes

    def add(name: str, t: torch.Tensor, f16: bool) -> None:
        a = np.ascontiguousarray(t.numpy().astype(np.float16 if f16 else np.float32))
        writer.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
        arrays.append(a)

    def add_predictor(name: str, t: torch.Tensor) -> None:
        t = t.detach().float().cpu()  # F32 where F16 would overflow (a folded per-layer threshold can scale fc2 up)
        add(name, t, predictor_dtype == "f16" and float(t.abs().max()) <= F16_MAX)

    embed = state["model.embed_tokens.weight"]
    add("token_embd.weight", embed, True)
    add("output_norm.weight", state["model.norm.weight"], False)
    add("output.weight", state.get("lm_head.weight", embed), True)  # tied embeddings: PowerInfer needs it anyway
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], False)
        add(f"blk.{i}.attn_q.weight", _permute(state[p + "self_attn.q_proj.weight"], n_head), True)
        add(f"blk.{i}.attn_k.weight", _permute(state[p + "self_attn.k_proj.weight"], n_kv), True)
        add(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"], True)
        add(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"], True)
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], False)
        add(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"], True)
        add(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"], True)
        if not sparse:
            add(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"], True)
            continue
        add(f"blk.{i}.ffn_down_t.weight", state[p + "mlp.down_proj.weight"].t().contiguous(), True)
        add_predictor(f"blk.{i}.fc1.weight", fc_layers[i]["fc1.weight"])
        add_predictor(f"blk.{i}.fc2.weight", fc_layers[i]["fc2.weight"])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        # The tensor data is written here rather than by writer.write_tensors_to_file(): that uses numpy's
        # ndarray.tofile, whose short write on a full disk raises OSError("3145728 requested and 1258880 written")
        # with no errno; Python's file writes raise the OS's error (ENOSPC, "No space left on device").
        align = int(writer.data_alignment)
        with open(path, "r+b") as f:
            f.seek(0, 2)
            _pad(f, align)
            for a in arrays:
                f.write(a.reshape(-1).view(np.uint8))
                _pad(f, align)
            if sparse:  # PowerInfer's sparse file: the GGUF layout under its own magic
                f.seek(0)
                f.write(POWERINFER_MAGIC)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # closing flushes what a full disk refused again
            writer.close()
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:  # say which file
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    return path


def _pad(f, align: int) -> None:
    pad = -f.tell() % align
    if pad:
        f.write(b"\0" * pad)


def tensor_bytes(path: Path) -> dict:
    """What the GGUF's tensors weigh, read from its header (no tensor data is read): the predictors (`fc1`/`fc2`)
    beside the MLP weights (`ffn_gate`, `ffn_up`, `ffn_down(_t)`), for sparsity_report.json."""
    infos = _tensor_infos(Path(path))
    groups = {"predictor": (".fc1.", ".fc2."), "mlp": (".ffn_gate.", ".ffn_up.", ".ffn_down.", ".ffn_down_t.")}
    out = {f"{g}_bytes": sum(b for n, _, b in infos if any(k in n for k in keys)) for g, keys in groups.items()}
    out["total_tensor_bytes"] = sum(b for _, _, b in infos)
    out["predictor_dtypes"] = sorted({t for n, t, _ in infos if ".fc1." in n or ".fc2." in n})
    out["file_bytes"] = Path(path).stat().st_size
    return out


def _tensor_infos(path: Path) -> list[tuple[str, str, int]]:
    """(name, ggml type name, bytes) of every tensor, from a GGUF v2/v3 header (`GGUF` or `PWRI` magic)."""
    import gguf

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
    string, array = 8, 9
    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated GGUF header")
            return struct.unpack(fmt, data)

        def skip_value(vtype: int) -> None:
            if vtype == string:
                f.seek(read("<Q")[0], 1)
            elif vtype == array:
                item, count = read("<IQ")
                if item in scalar:
                    f.seek(scalar[item] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                f.seek(scalar[vtype], 1)

        magic, version = f.read(4), read("<I")[0]
        if magic not in (b"GGUF", POWERINFER_MAGIC) or version not in (2, 3):
            raise ValueError(f"{path} is not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_kv = read("<QQ")
        for _ in range(n_kv):
            f.seek(read("<Q")[0], 1)  # the key
            skip_value(read("<I")[0])
        infos = []
        for _ in range(n_tensors):
            name = f.read(read("<Q")[0]).decode()
            dims = read(f"<{read('<I')[0]}Q")
            kind = gguf.GGMLQuantizationType(read("<I")[0])
            read("<Q")  # the offset
            block, size = gguf.GGML_QUANT_SIZES[kind]
            infos.append((name, kind.name, int(np.prod(dims, dtype=np.int64)) // block * size))
    return infos


def read_gguf(path: Path):
    """The file read back with the `gguf` package (which knows only the `GGUF` magic): a GGUFReader over a copy
    of the bytes with the standard magic."""
    import gguf

    data = bytearray(Path(path).read_bytes())
    if bytes(data[:4]) != POWERINFER_MAGIC:
        raise ValueError(f"{path} does not start with PowerInfer's magic {POWERINFER_MAGIC!r}")
    data[:4] = b"GGUF"
    copy = Path(path).with_suffix(".readback.gguf")
    copy.write_bytes(bytes(data))
    try:
        return gguf.GGUFReader(str(copy))
    finally:
        copy.unlink(missing_ok=True)


def write_activation_counts(counts: list[torch.Tensor], folder: Path) -> Path:
    """`folder/activation/activation_{i}.pt`: per layer, how often each neuron was active on calibration tokens."""
    out = folder / ACTIVATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(counts):
        torch.save(c.to(torch.int64).contiguous(), out / f"activation_{i}.pt")
    return out


def header_version(path: Path) -> int:
    with open(path, "rb") as f:
        f.read(4)
        return struct.unpack("<I", f.read(4))[0]
