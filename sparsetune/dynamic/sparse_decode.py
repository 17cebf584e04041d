"""End-to-end sparse decoding: generate with each MLP computing only the neurons its predictor keeps.

Prefill (many tokens) runs dense; every decoded token (batch 1, one position) asks the layer's predictor for
its active neurons and runs the batch-1 kernel (`kernels.py`) on those rows alone. Timing wraps the MLP calls
too, so the report separates the MLP's share from the rest of the step (attention, norms, LM head, Python).
"""

from __future__ import annotations

import contextlib
import time

import torch

from sparsetune.dynamic.kernels import DecodeWeights, kernel_in_use
from sparsetune.errors import SparsetuneError
from sparsetune.predictors.bank import PredictorBank
from sparsetune.surgery.sparse_mlp import patched_mlps, sparse_mlps


class _Timer:
    def __init__(self):
        self.seconds, self.kept, self.total = 0.0, 0, 0


@contextlib.contextmanager
def mlp_mode(model, bank: PredictorBank | None, timer: _Timer, kernel: str = "fused"):
    """Within: MLPs are timed; with a bank, single-token MLP calls compute only the predicted neurons."""
    mlps = sparse_mlps(model)
    if bank is not None and bank.cfg.lookahead:
        raise SparsetuneError("--generate: lookahead predictors are not supported for sparse decoding yet")
    if bank is not None and any(m.compensation is not None or any(p.bias is not None for p in m.projections())
                                for m in mlps):
        raise SparsetuneError("--generate: MLPs with biases are not supported by the sparse decode kernels yet")
    weights = {}
    if bank is not None:
        for m in mlps:
            gate, up, down = m.projections()
            weights[m.layer_idx] = DecodeWeights(gate.weight, up.weight, down.weight, m.activation.elementwise())

    def override(mlp, x):
        t0 = time.perf_counter()
        if bank is None or x.shape[0] * x.shape[1] != 1:
            out = mlp.dense(x)
        else:
            flat = x.reshape(-1)
            keep = bank.neurons[mlp.layer_idx](bank.features(mlp.layer_idx, x).reshape(-1))
            idx = (keep >= bank.threshold_for(mlp.layer_idx)).nonzero().squeeze(1)
            w = weights[mlp.layer_idx]
            out = getattr(w, kernel)(flat, idx).view_as(x)
            timer.kept += idx.numel()
            timer.total += w.w_gate.shape[0]
        timer.seconds += time.perf_counter() - t0
        return out

    with patched_mlps(model, override=override):
        yield


@torch.no_grad()
def _generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=model.config.eos_token_id)
    return out[0, prompt.shape[1]:], time.perf_counter() - t0


def _kernel_record(model) -> dict:
    """kernel_in_use() for the sparse MLPs of `model`: the fused kernel only if it applies to every one of them
    (otherwise the record of the first that falls back to the gather kernel)."""
    records = []
    for m in sparse_mlps(model):
        gate = m.projections()[0].weight
        records.append(kernel_in_use(gate.device, gate.dtype, m.activation.elementwise()))
    return next((r for r in records if r["kernel"] != "fused"), records[0] if records else kernel_in_use())


def decode_benchmark(model, bank: PredictorBank, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy decoding of `new_tokens` after `prompt` ([1, T]): dense vs predicted-sparse MLPs."""
    model.eval()
    bank.bind(model)
    # Builds the fused kernel now, outside the timed runs (a failed build prints a one-line notice), and records
    # what the sparse runs' kernel will be for this model's device, dtype and activation.
    kernel = _kernel_record(model)
    results = {}
    for mode, b in (("dense", None), ("sparse", bank)):
        timer = _Timer()
        with mlp_mode(model, b, timer):
            _generate(model, prompt, 4)  # warm-up (kernel load, allocator)
            timer.__init__()
            tokens, seconds = _generate(model, prompt, new_tokens)
        results[mode] = {"tokens_per_s": new_tokens / seconds, "seconds": seconds,
                         "mlp_ms_per_token": 1e3 * timer.seconds / new_tokens,
                         "mlp_share": timer.seconds / seconds, "tokens": tokens.tolist()}
        if b is not None:
            results[mode]["neurons_kept"] = timer.kept / max(1, timer.total)
    dense, sparse = results["dense"], results["sparse"]
    same = sum(int(a == b) for a, b in zip(dense["tokens"], sparse["tokens"]))
    return {"prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "kernel": kernel, "dense": dense, "sparse": sparse,
            "speedup": sparse["tokens_per_s"] / dense["tokens_per_s"],
            "mlp_speedup": dense["mlp_ms_per_token"] / max(sparse["mlp_ms_per_token"], 1e-9),
            "greedy_tokens_matching_dense": same / new_tokens}
