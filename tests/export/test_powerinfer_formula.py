"""PowerInfer's llama forward, re-implemented in numpy over the tensors of `model.powerinfer.gguf` as its loader reads
them (by GGUF name, with its metadata), reproduces sparsetune's logits: CI evidence, without the engine, that the
exported file computes the trained model.

The formula, read (not run) in PowerInfer's public source at commit d3ebd7c (SJTU-IPADS/PowerInfer):
  - build_llama (`llama.cpp:4949-5084`): per layer, attn_norm -> Q, K, V -> RoPE -> causal softmax(QK^T * kq_scale) V
    -> attn_output; `ffn_inp` = that + the layer input; ffn_norm -> the sparse FFN -> + ffn_inp; then output_norm and
    `output`. RMSNorm x / sqrt(mean(x^2) + eps) * weight (`ggml.c:9238-9284`, `llama.cpp:4420`); kq_scale
    1/sqrt(head_dim) (`llama.cpp:6500`, `llama.cpp:4799-4815`); K/V heads shared by n_head / n_head_kv query heads
    (ggml_mul_mat's broadcast).
  - RoPE mode 0 (`ggml.c:11163-11325`, rope_yarn with ext_factor 0): adjacent pairs (2i, 2i + 1) rotated by
    pos * base^(-2i/n_rot). It runs on the GGUF's Q/K rows as they are (permuted by the exporter): that the
    permutation is right is part of what this checks.
  - The sparse FFN (`llama.cpp:4652-4757`, LLM_FFN_RELU + LLM_FFN_PAR): idx = fc2 @ relu(fc1 @ ffn_inp); only rows
    with idx >= sparse_threshold of ffn_gate and ffn_up are computed (`ggml.c:14256`: the others are 0), then
    relu(gate) * up, and `ffn_down_t` rows are accumulated (axpy) for the same rows only (`ggml.c:14427`).

Numerics: ggml rounds the F32 input of a matmul with an F16 weight to F16 (`ggml.c:430-439, 9703-9715`) and caches
K/V in F16; `f16_activations=True` emulates that, to measure how far the engine's arithmetic may drift from the
formula (not asserted tightly: the formula is what is checked exactly).
"""

import json

import numpy as np
import pytest
import torch

from sparsetune.export.powerinfer import engine_mask, f16_margin, powerinfer_layers
from sparsetune.predictors.bank import load_predictors
from tests.export.test_powerinfer import powerinfer_export  # noqa: F401 - the module-scoped fixture (one tiny run)

pytestmark = pytest.mark.e2e


class PowerInferLlama:
    """The GGUF's tensors and metadata, and PowerInfer's llama forward over them (float64)."""

    def __init__(self, path):
        from sparsetune.export.powerinfer_gguf import read_gguf

        reader = read_gguf(path)
        self.t = {t.name: np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape)))
                  for t in reader.tensors}  # numpy order: ggml's dims reversed

        def value(key):
            f = reader.fields[key]
            return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()[0]

        self.n_layer = int(value("llama.block_count"))
        self.n_head, self.n_kv = int(value("llama.attention.head_count")), int(value("llama.attention.head_count_kv"))
        self.n_rot = int(value("llama.rope.dimension_count"))
        self.base = float(value("llama.rope.freq_base"))
        self.eps = float(value("llama.attention.layer_norm_rms_epsilon"))
        self.threshold = float(value("powerinfer.sparse_threshold"))

    def w(self, name: str) -> np.ndarray:
        return self.t[name].astype(np.float64)

    def _rms(self, x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.w(weight)

    def _rope(self, x):  # x [T, heads, hd]; ggml rope mode 0
        pos = np.arange(x.shape[0], dtype=np.float64)[:, None]
        theta = pos * self.base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)  # [T, hd/2]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def predictor(self, layer: int, ffn_inp: np.ndarray) -> np.ndarray:
        """idx = fc2 @ relu(fc1 @ ffn_inp), [T, n_ff]."""
        return np.maximum(ffn_inp @ self.w(f"blk.{layer}.fc1.weight").T, 0) @ self.w(f"blk.{layer}.fc2.weight").T

    def forward(self, ids: np.ndarray, masks=None, f16_activations: bool = False):
        """Logits [T, vocab] for one sequence, and each layer's `ffn_inp`. `masks[layer]` ([T, n_ff] bool), when
        given, replaces the predictor's choice (idx >= threshold) of the rows computed."""
        h16 = (lambda a: a.astype(np.float16).astype(np.float64)) if f16_activations else (lambda a: a)
        x = self.w("token_embd.weight")[ids]
        T, hd = len(ids), self.n_rot
        causal = np.triu(np.full((T, T), -np.inf), 1)
        ffn_inps = []
        for i in range(self.n_layer):
            b = f"blk.{i}."
            cur = h16(self._rms(x, b + "attn_norm.weight"))
            q = self._rope((cur @ self.w(b + "attn_q.weight").T).reshape(T, self.n_head, hd))
            k = h16(self._rope((cur @ self.w(b + "attn_k.weight").T).reshape(T, self.n_kv, hd)))  # F16 KV cache
            v = h16((cur @ self.w(b + "attn_v.weight").T).reshape(T, self.n_kv, hd))
            heads = []
            for head in range(self.n_head):
                kv = head // (self.n_head // self.n_kv)
                s = h16(q[:, head]) @ k[:, kv].T / np.sqrt(hd) + causal
                p = np.exp(s - s.max(-1, keepdims=True))
                heads.append(h16(p / p.sum(-1, keepdims=True)) @ v[:, kv])
            ffn_inp = h16(np.concatenate(heads, -1)) @ self.w(b + "attn_output.weight").T + x
            ffn_inps.append(ffn_inp)
            cur = h16(self._rms(ffn_inp, b + "ffn_norm.weight"))
            keep = masks[i] if masks is not None else self.predictor(i, h16(ffn_inp)) >= self.threshold
            gate, up, down_t = (self.w(b + n) for n in ("ffn_gate.weight", "ffn_up.weight", "ffn_down_t.weight"))
            out = np.zeros_like(ffn_inp)
            for tok in range(T):  # only the kept rows of gate and up, and of down_t (axpy)
                rows = np.flatnonzero(keep[tok])
                a = np.maximum(gate[rows] @ cur[tok], 0) * (up[rows] @ cur[tok])
                out[tok] = h16(a) @ down_t[rows]
            x = out + ffn_inp
        return h16(self._rms(x, "output_norm.weight")) @ self.w("output.weight").T, ffn_inps


def _sparsetune_forward(out, ids, f16_weights: bool, mask: str, edit_bank=None):
    """sparsetune's float32 forward of the export (its own loader), the 2-D weights rounded to F16 as the GGUF
    holds them when `f16_weights`; per layer the residual stream before the post-attention norm, and the mask
    used: 'oracle' (the neurons whose activation is nonzero; every neuron computed) or 'predicted' (the predictors'
    choice, as `eval --dynamic` applies it: down sees only the kept neurons)."""
    from sparsetune import load_sparse_model
    from sparsetune.evaluation.dynamic import predicted_mask
    from sparsetune.surgery.sparse_mlp import patched_mlps

    model = load_sparse_model(out).eval()
    if f16_weights:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    bank = load_predictors(out).bind(model)
    if edit_bank is not None:
        edit_bank(bank)
    choose = predicted_mask(bank)
    residuals, masks = {}, {}

    def override(mlp, x):
        i = mlp.layer_idx
        residuals[i] = bank.features(i, x).reshape(-1, x.shape[-1]).clone()
        if mask == "predicted":
            keep = choose(mlp, x)
            masks[i] = keep.reshape(-1, keep.shape[-1])
            return mlp.dense(x, mask=lambda *_: keep)
        gate_proj, up_proj, _ = mlp.projections()
        masks[i] = (mlp.activation(gate_proj(x), up_proj(x)) != 0).reshape(-1, gate_proj.out_features)
        return mlp.dense(x)

    with torch.no_grad(), patched_mlps(model, override=override):
        logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
    return logits.double().numpy(), residuals, masks, bank


def _ids(vocab: int, n: int = 40) -> np.ndarray:
    return np.random.default_rng(3).integers(3, vocab, n)


def _file_rows(masks, order):
    """Masks [T, n_ff] in the model's neuron order -> the GGUF's row order (file row r holds neuron order[r])."""
    return [m if order is None else m[:, order[i].numpy()] for i, m in enumerate(masks)]


def test_powerinfers_formula_on_the_gguf_gives_sparsetunes_logits_with_oracle_masks(powerinfer_export):  # noqa: F811
    """The export's GGUF holds each layer's neurons hot-first (powerinfer_neuron_order.safetensors): with the oracle
    masks mapped to its rows, the formula on the permuted file gives sparsetune's logits (the permutation is an
    exact identity); the masks left in the model's order give other logits (the rows really are permuted)."""
    from sparsetune.export.powerinfer_gguf import GGUF_FILE, read_neuron_order

    _, out = powerinfer_export
    engine = PowerInferLlama(out / GGUF_FILE)
    order = read_neuron_order(out)
    ids = _ids(engine.t["token_embd.weight"].shape[0])
    ours, _, oracle, _ = _sparsetune_forward(out, ids, f16_weights=True, mask="oracle")
    model_order = [oracle[i].numpy() for i in range(engine.n_layer)]
    masks = _file_rows(model_order, order)
    skipped = 1 - float(np.mean(masks))
    assert 0.2 < skipped < 0.95  # ReLU: a real share of the rows is never computed
    theirs, _ = engine.forward(ids, masks)
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() <= 1e-5 * scale + 1e-5  # float32 vs float64 summation only
    # not vacuous: computing no FFN row at all, the masks in the model's order rather than the file's, or the Q/K
    # rows un-permuted, gives other logits
    none = engine.forward(ids, [np.zeros_like(m) for m in masks])[0]
    assert np.abs(none - ours).max() > 1e-3 * scale
    assert np.abs(engine.forward(ids, model_order)[0] - ours).max() > 1e-3 * scale
    unpermuted = PowerInferLlama(out / GGUF_FILE)
    for i in range(engine.n_layer):  # ggml's rope on Hugging Face's row order: wrong for every position > 0
        for name, heads in (("attn_q", engine.n_head), ("attn_k", engine.n_kv)):
            w = unpermuted.t[f"blk.{i}.{name}.weight"]
            hd = engine.n_rot
            unpermuted.t[f"blk.{i}.{name}.weight"] = w.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
    assert np.abs(unpermuted.forward(ids, masks)[0] - ours).max() > 1e-3 * scale
    # the F16 weights are the only difference from the export's float32 weights; ggml's F16 activations add a little
    exact, _, _, _ = _sparsetune_forward(out, ids, f16_weights=False, mask="oracle")
    rounded = engine.forward(ids, masks, f16_activations=True)[0]
    print(f"\nmax |logit| {scale:.3f}; formula vs sparsetune (F16 weights) {np.abs(theirs - ours).max():.2e}; "
          f"vs F32 weights {np.abs(theirs - exact).max():.2e}; with ggml's F16 activations "
          f"{np.abs(rounded - ours).max():.2e}; rows skipped {skipped:.1%}")
    assert np.abs(theirs - exact).max() <= 2e-2 * scale and np.abs(rounded - ours).max() <= 2e-2 * scale


@pytest.mark.parametrize("cut", ["exported", "median"])
def test_powerinfers_predictor_formula_on_the_gguf_gives_sparsetunes_masks_and_logits(
        powerinfer_export, tmp_path, cut):  # noqa: F811
    """idx = fc2 relu(fc1 r) >= sparse_threshold from the GGUF's tensors keeps what sparsetune's predictors keep on the
    same residual rows (exactly with F32 predictors; with the default F16 ones, computed as ggml does, except
    within F16 rounding of the threshold), and the formula run with sparsetune's predicted masks gives the logits of
    sparsetune's predicted-mask forward. `exported`: the export's own file (per-layer thresholds calibrated to 0.99
    mass recall, folded into fc2: most neurons kept on random tokens); `median`: the same predictors with one global
    threshold at their median output, a cut of about half, written by the same code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsetune.export.powerinfer_gguf import GGUF_FILE, read_neuron_order, write_gguf

    _, out = powerinfer_export
    vocab = PowerInferLlama(out / GGUF_FILE).t["token_embd.weight"].shape[0]
    ids = _ids(vocab)
    edit = None
    if cut == "median":
        _, residuals, _, bank = _sparsetune_forward(out, ids, True, "predicted")
        with torch.no_grad():
            median = float(torch.cat([bank.neurons[i](r).flatten() for i, r in residuals.items()]).median())

        def edit(bank):
            bank.layer_thresholds = None
            bank.cfg.threshold = float(torch.sigmoid(torch.tensor(median, dtype=torch.float64)))

    ours, residuals, predicted, bank = _sparsetune_forward(out, ids, True, "predicted", edit)
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    threshold, fc_layers = powerinfer_layers(bank, [b.post_attention_layernorm.weight for b in lm.model.layers])
    engines = {dtype: PowerInferLlama(write_gguf(lm, tokenizer, fc_layers, threshold, tmp_path / f"{dtype}.gguf",
                                                 predictor_dtype=dtype)) for dtype in ("f16", "f32")}
    orders = {"f16": None, "f32": None}  # written here in the model's own order; the export's file hot-first
    if cut == "exported":
        engines["f16"] = PowerInferLlama(out / GGUF_FILE)
        orders["f16"] = read_neuron_order(out)
        assert engines["f16"].threshold == pytest.approx(json.loads((out / "sparsity_report.json").read_text())
                                                         ["powerinfer"]["sparse_threshold"])
    n_layer = engines["f16"].n_layer
    differ = total = 0
    for i in range(n_layer):
        r = residuals[i]
        with torch.no_grad():
            assert torch.equal(predicted[i], bank.neurons[i](r) >= bank.threshold_for(i))  # r: what they read
        fc1, fc2 = (torch.tensor(engines["f16"].t[f"blk.{i}.{n}.weight"]) for n in ("fc1", "fc2"))
        assert fc1.dtype == fc2.dtype == torch.float16
        on_gguf = engine_mask(fc1, fc2, threshold, r)  # as ggml computes it: F16 inputs, F32 sums
        wrong = on_gguf != (predicted[i] if orders["f16"] is None else predicted[i][:, orders["f16"][i]])
        margin = (torch.from_numpy(engines["f16"].predictor(i, r.double().numpy())) - threshold).abs()
        assert (margin[wrong] <= f16_margin(fc1, fc2, r)[wrong].double()).all(), i
        differ, total = differ + int(wrong.sum()), total + wrong.numel()
        fc1, fc2 = (torch.tensor(engines["f32"].t[f"blk.{i}.{n}.weight"]) for n in ("fc1", "fc2"))
        assert fc1.dtype == fc2.dtype == torch.float32
        assert torch.equal(engine_mask(fc1, fc2, threshold, r), predicted[i]), i  # F32 predictors: exact
    assert differ <= 0.02 * total
    kept = float(np.mean([predicted[i].float().mean() for i in range(n_layer)]))
    assert 0 < kept < 1 if cut == "exported" else 0.3 < kept < 0.7
    for dtype, engine in engines.items():  # the predicted rows, run through the formula (in each file's row order)
        theirs, _ = engine.forward(ids, _file_rows([predicted[i].numpy() for i in range(n_layer)], orders[dtype]))
        assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max() + 1e-5
    print(f"\n{cut}: predicted masks keep {kept:.1%}; F16 predictors (as ggml computes them) disagree with "
          f"sparsetune's on {differ} of {total} (token, neuron) pairs, each within F16 rounding of the threshold")
