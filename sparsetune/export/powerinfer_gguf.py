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
  - Neuron order: a layer's MLP neurons may be written in any order (`write_gguf(neuron_order=...)`: the rows of
    `ffn_gate`, `ffn_up`, `ffn_down_t` and `fc2`, the columns of `ffn_down`, permuted alike), an exact identity of
    the model's function; `export --powerinfer` writes them hot-first and records the order in
    `powerinfer_neuron_order.safetensors` (`layer.{i}`: file row r holds the model's neuron order[r]), with the
    activation counts in the same (file-row) order.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from sparsetune.errors import SparsetuneError

GGUF_FILE = "model.powerinfer.gguf"
NEURON_ORDER_FILE = "powerinfer_neuron_order.safetensors"
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


def relu_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What PowerInfer's sparse llama FFN computes on the neurons its predictors keep (llama.cpp:5050)."""
    return torch.relu(gate) * up


def check_activation(spec: dict, activations: list) -> None:
    """Refuse (one line) an activation whose kept neurons do not compute relu(gate) * up: PowerInfer computes that
    and nothing else, its predictors deciding the zeros (asked of the activation's per-neuron math)."""
    if not all(a.elementwise().computes(relu_up) for a in activations):
        raise SparsetuneError(f"--powerinfer: activation {spec['activation']!r} cannot run truthfully in PowerInfer's "
                              "llama path (it computes relu(gate) * up on the neurons its predictors keep, and nothing "
                              "else); export a relu run, or export without --powerinfer")


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


def check_neuron_order(neuron_order, n_layer: int, n_ff: int) -> list[torch.Tensor]:
    """`neuron_order` as int64 tensors, refused (ValueError) unless it is one permutation of range(n_ff) per layer."""
    if len(neuron_order) != n_layer:
        raise ValueError(f"neuron_order: {len(neuron_order)} layers given, the model has {n_layer}")
    out = []
    for i, order in enumerate(neuron_order):
        order = torch.as_tensor(order).detach().cpu().to(torch.int64).reshape(-1)
        if order.numel() != n_ff or not torch.equal(torch.sort(order).values, torch.arange(n_ff)):
            raise ValueError(f"neuron_order[{i}] is not a permutation of range({n_ff})")
        out.append(order)
    return out


def write_gguf(lm, tokenizer, fc_layers: list[dict[str, torch.Tensor]] | None, threshold: float, path: Path,
               name: str = "sparsetune export", predictor_dtype: str = "f16",
               neuron_order: list[torch.Tensor] | None = None) -> Path:
    """Write `lm` (a plain HF Llama with ReLU MLPs), its tokenizer and the PowerInfer predictor tensors
    (`fc1.weight` [r, d], `fc2.weight` [m, r] per layer, for idx = fc2 relu(fc1 residual) >= threshold).
    `fc_layers=None` writes a plain GGUF of the same weights for PowerInfer's dense path instead (`GGUF` magic,
    `ffn_down`, no predictors; llama.cpp:3423): that path applies SiLU, so it is a speed reference only.
    `predictor_dtype`: "f16" (PowerInfer's converters' default; a predictor tensor whose values F16 cannot hold is
    written F32) or "f32". `neuron_order`: per layer a permutation of range(n_ff); file row r of every per-neuron
    tensor (`ffn_gate`, `ffn_up`, `ffn_down_t`, `fc2` rows; `ffn_down` columns) then holds the model's neuron
    order[r] (the same function, exactly); None writes the model's own order. A failed write removes the partial file
    and raises the OS's own error (ENOSPC: "No space left on device")."""
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise ValueError(f"predictor_dtype must be one of {PREDICTOR_DTYPES}, got {predictor_dtype!r}")
    sparse = fc_layers is not None
    path = Path(path)
    cfg = lm.config
    check_model(cfg)
    rope = rope_settings(cfg)
    state = {k: v.detach().float().cpu() for k, v in lm.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if neuron_order is not None:
        neuron_order = check_neuron_order(neuron_order, int(cfg.num_hidden_layers), int(cfg.intermediate_size))

    def rows(t: torch.Tensor, layer: int) -> torch.Tensor:  # a per-neuron tensor's rows in the file's order
        return t if neuron_order is None else t[neuron_order[layer]]

    def metadata(writer) -> None:
        add_llama_metadata(writer, name=name, context_length=int(cfg.max_position_embeddings),
                           n_embd=int(cfg.hidden_size), n_layer=int(cfg.num_hidden_layers),
                           n_ff=int(cfg.intermediate_size), n_head=int(n_head), n_head_kv=int(n_kv),
                           rms_eps=float(cfg.rms_norm_eps), rope_theta=rope["theta"],
                           rope_linear_factor=rope["factor"] if rope["type"] == "linear" else None,
                           sparse_threshold=float(threshold) if sparse else None)
        _vocab(writer, tokenizer, int(cfg.vocab_size))

    arrays: dict[str, np.ndarray] = {}

    def add(name: str, t: torch.Tensor, f16: bool) -> None:
        arrays[name] = np.ascontiguousarray(t.numpy().astype(np.float16 if f16 else np.float32))

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
        add(f"blk.{i}.ffn_gate.weight", rows(state[p + "mlp.gate_proj.weight"], i), True)
        add(f"blk.{i}.ffn_up.weight", rows(state[p + "mlp.up_proj.weight"], i), True)
        down_t = rows(state[p + "mlp.down_proj.weight"].t(), i)  # [n_ff, n_embd]: one row per neuron
        if not sparse:
            add(f"blk.{i}.ffn_down.weight", down_t.t().contiguous(), True)
            continue
        add(f"blk.{i}.ffn_down_t.weight", down_t.contiguous(), True)
        add_predictor(f"blk.{i}.fc1.weight", fc_layers[i]["fc1.weight"])
        add_predictor(f"blk.{i}.fc2.weight", rows(fc_layers[i]["fc2.weight"].detach().float().cpu(), i))
    rank = [int(fc["fc1.weight"].shape[0]) for fc in fc_layers] if sparse else None  # per layer (wildcard)
    layout = llama_tensor_specs(int(cfg.vocab_size), int(cfg.hidden_size), int(cfg.num_hidden_layers),
                                int(cfg.intermediate_size), int(cfg.hidden_size // n_head * n_kv), rank)
    if [(n, tuple(s)) for n, s, _ in layout] != [(n, a.shape) for n, a in arrays.items()]:
        raise SparsetuneError("--powerinfer: the tensors to write do not match PowerInfer's llama layout "
                              "(llama_tensor_specs)")
    # each tensor's own dtype: a predictor F16 cannot hold stays F32
    specs = [(n, a.shape, a.dtype) for n, a in arrays.items()]
    return write_gguf_tensors(path, metadata, specs, arrays.values(), sparse)


def add_llama_metadata(writer, *, name: str, context_length: int, n_embd: int, n_layer: int, n_ff: int, n_head: int,
                       n_head_kv: int, rms_eps: float, rope_theta: float, rope_linear_factor: float | None = None,
                       sparse_threshold: float | None = None) -> None:
    """The `llama.*` hyperparameters PowerInfer's loader reads (llama.cpp:327-347, 2356), the F16 file type and, for
    the sparse file, `powerinfer.sparse_threshold` (llama.cpp:362, 2345-2350). The vocabulary is added separately."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(int(context_length))
    writer.add_embedding_length(int(n_embd))
    writer.add_block_count(int(n_layer))
    writer.add_feed_forward_length(int(n_ff))
    writer.add_rope_dimension_count(int(n_embd // n_head))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_head_kv))
    writer.add_layer_norm_rms_eps(float(rms_eps))
    writer.add_rope_freq_base(float(rope_theta))
    if rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_linear_factor))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if sparse_threshold is not None:
        writer.add_float32("powerinfer.sparse_threshold", float(sparse_threshold))


def llama_tensor_specs(n_vocab: int, n_embd: int, n_layer: int, n_ff: int, n_embd_kv: int,
                       rank: int | list[int] | None = None,
                       predictor_dtype: str = "f16") -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, numpy shape, dtype) of every tensor PowerInfer's llama loader requires, in the order `write_gguf`
    writes them (numpy shapes are ggml's dims reversed; llama.cpp:3236-3264 sparse, :3423 dense). `rank=None`: the
    dense-path file (`ffn_down` {n_ff, n_embd} as ggml names it, no predictors); otherwise `ffn_down_t` and the
    predictors `fc1` [rank, n_embd], `fc2` [n_ff, rank], `rank` one for all layers or one per layer (the loader
    takes each layer's from its tensors: `{n_embd, GGML_NE_WILDCARD}`, llama.cpp:3263-3264). 2-D weights F16, norms
    F32, predictors `predictor_dtype`."""
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise ValueError(f"predictor_dtype must be one of {PREDICTOR_DTYPES}, got {predictor_dtype!r}")
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    pred = f16 if predictor_dtype == "f16" else f32
    specs = [("token_embd.weight", (n_vocab, n_embd), f16), ("output_norm.weight", (n_embd,), f32),
             ("output.weight", (n_vocab, n_embd), f16)]
    ranks = None if rank is None else [rank] * n_layer if isinstance(rank, int) else list(rank)
    for i in range(n_layer):
        b = f"blk.{i}."
        specs += [(b + "attn_norm.weight", (n_embd,), f32), (b + "attn_q.weight", (n_embd, n_embd), f16),
                  (b + "attn_k.weight", (n_embd_kv, n_embd), f16), (b + "attn_v.weight", (n_embd_kv, n_embd), f16),
                  (b + "attn_output.weight", (n_embd, n_embd), f16), (b + "ffn_norm.weight", (n_embd,), f32),
                  (b + "ffn_gate.weight", (n_ff, n_embd), f16), (b + "ffn_up.weight", (n_ff, n_embd), f16)]
        if ranks is None:
            specs.append((b + "ffn_down.weight", (n_embd, n_ff), f16))
        else:
            specs += [(b + "ffn_down_t.weight", (n_ff, n_embd), f16), (b + "fc1.weight", (ranks[i], n_embd), pred),
                      (b + "fc2.weight", (n_ff, ranks[i]), pred)]
    return specs


def write_gguf_tensors(path: Path, metadata, specs, data, sparse: bool) -> Path:
    """Write a GGUF holding the tensors `specs` ((name, numpy shape, dtype), in file order) with the key/values that
    `metadata(writer)` adds (architecture `llama`), streaming their data from `data`: one item per spec, either an
    array of exactly that shape and dtype or an iterable of row blocks (arrays of that dtype whose first dimensions
    add up to the spec's), so a model larger than memory is written a tensor or a block at a time. `sparse`:
    PowerInfer's `PWRI` magic instead of `GGUF`. A failed write removes the partial file and raises the OS's own
    error (ENOSPC: "No space left on device")."""
    import gguf

    path = Path(path)
    specs = [(str(n), tuple(int(x) for x in shape), np.dtype(dt)) for n, shape, dt in specs]
    writer = gguf.GGUFWriter(str(path), "llama")
    metadata(writer)
    for name, shape, dtype in specs:
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        # The tensor data is written here rather than by writer.write_tensors_to_file(): that uses numpy's
        # ndarray.tofile, whose short write on a full disk raises OSError("3145728 requested and 1258880 written")
        # with no errno; Python's file writes raise the OS's error (ENOSPC, "No space left on device").
        align = int(writer.data_alignment)
        items = iter(data)
        with open(path, "r+b") as f:
            f.seek(0, 2)
            _pad(f, align)
            for name, shape, dtype in specs:
                item = next(items, None)
                if item is None:
                    raise ValueError(f"{path}: no data for tensor {name} (fewer data items than specs)")
                _write_tensor(f, name, shape, dtype, item)
                _pad(f, align)
            if next(items, None) is not None:
                raise ValueError(f"{path}: more data items than tensor specs")
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


def _write_tensor(f, name: str, shape: tuple[int, ...], dtype: np.dtype, item) -> None:
    """One tensor's data: `item` is the whole array or an iterable of row blocks; dtype and shape are checked."""
    rows = 0
    for block in [item] if isinstance(item, np.ndarray) else item:
        if block.dtype != dtype or block.ndim != len(shape) or block.shape[1:] != shape[1:]:
            raise ValueError(f"tensor {name}: got {block.dtype} {block.shape}, the layout says {dtype} {shape}")
        f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
        rows += block.shape[0]
    if rows != shape[0]:
        raise ValueError(f"tensor {name}: {rows} rows written, the layout says {dtype} {shape}")


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


def open_gguf(path: Path, mode: str = "r"):
    """A GGUFReader over the file itself (memory-mapped, nothing copied), `GGUF` or PowerInfer's `PWRI` magic: for
    files too large for `read_gguf`'s copy. Its tensors' `data_offset` are absolute file offsets; `mode="r+"` maps
    the file writable."""
    import gguf
    import gguf.gguf_reader as reader_module

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"GGUF", POWERINFER_MAGIC):
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r})")
    saved = reader_module.GGUF_MAGIC
    reader_module.GGUF_MAGIC = struct.unpack("<I", magic)[0]  # the reader compares the first 4 bytes with this
    try:
        return gguf.GGUFReader(str(path), mode)
    finally:
        reader_module.GGUF_MAGIC = saved


def write_activation_counts(counts: list[torch.Tensor], folder: Path,
                            neuron_order: list[torch.Tensor] | None = None) -> Path:
    """`folder/activation/activation_{i}.pt`: per layer, how often each neuron was active on calibration tokens, in
    the GGUF's row order (`neuron_order`, as given to `write_gguf`: PowerInfer's split solver reads entry r as the
    count of file row r)."""
    out = folder / ACTIVATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    if neuron_order is not None:
        neuron_order = check_neuron_order(neuron_order, len(counts), int(counts[0].numel()) if counts else 0)
    for i, c in enumerate(counts):
        c = c.detach().cpu().to(torch.int64).reshape(-1)
        torch.save((c if neuron_order is None else c[neuron_order[i]]).contiguous(), out / f"activation_{i}.pt")
    return out


def write_neuron_order(neuron_order: list[torch.Tensor], folder: Path) -> Path:
    """`folder/powerinfer_neuron_order.safetensors`: one int64 tensor per layer, `layer.{i}`; file row r of the GGUF
    holds the model's neuron order[r] (`model_neuron = order[file_row]`; `file_row = argsort(order)[model_neuron]`)."""
    from safetensors.torch import save_file

    path = Path(folder) / NEURON_ORDER_FILE
    save_file({f"layer.{i}": torch.as_tensor(o).to(torch.int64).contiguous() for i, o in enumerate(neuron_order)},
              str(path))
    return path


def read_neuron_order(folder: Path) -> list[torch.Tensor] | None:
    """The order `write_neuron_order` recorded in `folder` (a list per layer), or None where the export has none
    (the GGUF then holds the model's own order)."""
    from safetensors.torch import load_file

    path = Path(folder) / NEURON_ORDER_FILE
    if not path.exists():
        return None
    tensors = load_file(str(path))
    return [tensors[f"layer.{i}"] for i in range(len(tensors))]


def header_version(path: Path) -> int:
    with open(path, "rb") as f:
        f.read(4)
        return struct.unpack("<I", f.read(4))[0]
