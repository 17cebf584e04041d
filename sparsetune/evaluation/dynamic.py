"""Dynamic-activation evaluation: perplexity when neurons and heads are skipped for real.

Modes (the same held-out batches each time):
  dense       every neuron and head computed
  oracle      MLPs compute only the truly active neurons (known from the dense activation)
  predicted   MLPs compute only the neurons the predictor keeps (sparse products over the kept pairs, not masked after)
  heads_kv_written / heads_kv_skipped
              dense MLPs; attention heads the head predictor drops are skipped, with their KV
              entries still written / not written (see head_skipping.py)
"""

from __future__ import annotations

import contextlib

import torch

from sparsetune.dynamic.head_skipping import head_skipping, kv_written_mask
from sparsetune.dynamic.masked_mlp import gathered_mlp
from sparsetune.evaluation.perplexity import evaluate
from sparsetune.models.structure import base_causal_lm, decoder_layers
from sparsetune.predictors.bank import PredictorBank
from sparsetune.predictors.labels import neuron_labels
from sparsetune.surgery.sparse_mlp import patched_mlps


class _KeptFraction:
    def __init__(self):
        self.kept = 0.0
        self.total = 0.0

    def add(self, keep: torch.Tensor) -> None:
        self.kept += float(keep.sum())
        self.total += keep.numel()

    def sparsity(self, all_reduce=None) -> float | None:
        """Skipped fraction over every rank's tokens when `all_reduce` (a sum over ranks) is given."""
        kept, total = self.kept, self.total
        if all_reduce is not None:
            kept, total = (float(v) for v in all_reduce(torch.tensor([kept, total], dtype=torch.float64)))
        return 1.0 - kept / total if total else None


@contextlib.contextmanager
def _mlp_override(model, choose_mask, tally: _KeptFraction):
    """Every SparseMLP computes only the neurons `choose_mask(mlp, x)` keeps."""

    def override(mlp, x):
        keep = choose_mask(mlp, x)
        if keep is None:  # no mask for this layer (e.g. layer 0 under lookahead): dense
            return mlp.dense(x)
        tally.add(keep)
        g, u, d = mlp.projections()
        return gathered_mlp(x, keep, g, u, d, mlp.activation.elementwise())

    with patched_mlps(model, override=override):
        yield


def oracle_mask(exact_zeros: bool, active_fraction: float):
    def choose(mlp, x):
        g, u, _ = mlp.projections()
        return neuron_labels(mlp.activation(g(x), u(x)), exact_zeros, active_fraction)
    return choose


def predicted_mask(bank: PredictorBank):
    inputs: dict[int, torch.Tensor] = {}

    def choose(mlp, x):
        layer = mlp.layer_idx
        if bank.cfg.lookahead:  # layer i's mask comes from layer i-1's input
            inputs[layer] = x
            prev = inputs.pop(layer - 1, None)
            return None if prev is None else bank.neuron_mask(layer - 1, prev)
        return bank.neuron_mask(layer, x)
    return choose


@contextlib.contextmanager
def _head_masks(model, bank: PredictorBank, tally: _KeptFraction | None = None,
                kv_tally: _KeptFraction | None = None):
    """Pre-hooks that set each attention module's head mask from its input with the head predictors. `tally`
    counts query heads run; `kv_tally` the KV entries written under the per-KV-head rule (GQA)."""
    handles = []
    config = base_causal_lm(model).config
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for idx, layer in enumerate(decoder_layers(model)):
        def set_mask(module, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            module.sparsetune_head_mask = bank.head_mask(idx, hidden)
            if tally is not None:
                tally.add(module.sparsetune_head_mask)
            if kv_tally is not None:
                kv_tally.add(kv_written_mask(module.sparsetune_head_mask, num_kv))
        handles.append(layer.self_attn.register_forward_pre_hook(set_mask, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for layer in decoder_layers(model):
            layer.self_attn.sparsetune_head_mask = None


@torch.no_grad()
def dynamic_eval(model, bank: PredictorBank | None, batches, device, exact_zeros: bool,
                 silu_active_fraction: float = 0.3, all_reduce=None) -> dict:
    """{mode: {'perplexity', 'sparsity'}} for every mode that applies. With several processes, `all_reduce`
    (a sum over ranks) makes every figure one over all ranks' batches, not this rank's."""
    batches = list(batches)

    def perplexity() -> float:
        return evaluate(model, batches, None, device, all_reduce=all_reduce)["perplexity"]

    out = {"dense": {"perplexity": perplexity(), "sparsity": 0.0}}
    tally = _KeptFraction()
    with _mlp_override(model, oracle_mask(exact_zeros, silu_active_fraction), tally):
        out["oracle"] = {"perplexity": perplexity(), "sparsity": tally.sparsity(all_reduce)}
    if bank is not None:
        tally = _KeptFraction()
        with _mlp_override(model, predicted_mask(bank), tally):
            out["predicted"] = {"perplexity": perplexity(), "sparsity": tally.sparsity(all_reduce)}
        if bank.heads is not None:
            for mode in ("kv_written", "kv_skipped"):
                heads, kv = _KeptFraction(), _KeptFraction() if mode == "kv_skipped" else None
                with _head_masks(model, bank, tally=heads, kv_tally=kv), head_skipping(model, mode):
                    out[f"heads_{mode}"] = {"perplexity": perplexity(), "sparsity": heads.sparsity(all_reduce)}
                if mode == "kv_skipped":  # what an engine can leave out of the cache: whole KV heads only
                    out[f"heads_{mode}"].update(kv_policy="per KV head: an entry is skipped only when every query "
                                                "head sharing it is dropped", kv_sparsity=kv.sparsity(all_reduce))
    return out
