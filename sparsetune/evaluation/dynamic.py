"""Dynamic-activation evaluation: perplexity when neurons and heads are skipped for real.

Modes (the same held-out batches each time):
  dense       every neuron and head computed
  oracle      MLPs compute only the truly active neurons (known from the dense activation)
  predicted   MLPs compute only the neurons the predictor keeps (sparse products over the kept pairs, not masked after)
  prompt      prompt-derived masks (TDA / GRIFFIN): the first part of each sequence is the prompt, run densely; each
              layer keeps, per sequence, the neurons that carried the most of the prompt's MLP output, and the rest
              of the sequence computes only those. Measured on the continuation tokens only, beside dense, oracle
              and the best per-token masks at the same skipped fraction on the same tokens (`continuation_*`)
  heads_kv_written / heads_kv_skipped
              dense MLPs; attention heads the head predictor drops are skipped, with their KV
              entries still written / not written (see head_skipping.py)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from sparsetune.dynamic.head_skipping import head_skipping, kv_written_mask
from sparsetune.dynamic.masked_mlp import gathered_mlp
from sparsetune.evaluation.perplexity import evaluate
from sparsetune.predictors.bank import PredictorBank
from sparsetune.predictors.labels import neuron_labels
from sparsetune.sparsity.cett import contributions
from sparsetune.surgery.sparse_mlp import SparseMLP, patched_mlps
from sparsetune.surgery.structure import base_causal_lm, decoder_layers, readable_weight


class KeptFraction:
    """Kept / total counts of (token, unit) pairs while masks are applied: the skipped fraction of a mode."""

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


class MaskRecall:
    """Recall and mass recall of the masks a mode applies, on the tokens it is measured on: the share of truly
    active neurons kept, and the share of their output contribution |a_j| * ||W_down[:, j]|| the kept ones carry."""

    def __init__(self, exact_zeros: bool, active_fraction: float):
        self.exact_zeros, self.active_fraction = exact_zeros, active_fraction
        self.sums = torch.zeros(4, dtype=torch.float64)  # kept active, active, kept mass, mass

    def scored(self, choose_mask):
        def choose(mlp, x):
            keep = choose_mask(mlp, x)
            if keep is not None:
                g, u, _ = mlp.projections()
                a = mlp.activation(g(x), u(x))
                active = neuron_labels(a, self.exact_zeros, self.active_fraction)
                mass = neuron_contributions(mlp, a) * active
                self.sums += torch.tensor([float((keep & active).sum()), float(active.sum()),
                                           float((mass * keep).sum()), float(mass.sum())], dtype=torch.float64)
            return keep
        return choose

    def summary(self, all_reduce=None) -> dict:
        sums = all_reduce(self.sums.clone()) if all_reduce is not None else self.sums
        kept, active, kept_mass, mass = (float(v) for v in sums)
        return {"recall": kept / active if active else None, "mass_recall": kept_mass / mass if mass else None}


def neuron_contributions(mlp: SparseMLP, a: torch.Tensor) -> torch.Tensor:
    """Each neuron's contribution to the MLP output, |a_j| * ||W_down[:, j]|| (`sparsity.cett.contributions`)."""
    return contributions(a, readable_weight(mlp.projections()[2]).detach().float().norm(dim=0))


def _masked(mlp: SparseMLP, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    g, u, d = mlp.projections()
    return mlp.compensate(gathered_mlp(x, keep, g, u, d, mlp.activation.elementwise()))


@contextlib.contextmanager
def mlp_override(model, choose_mask, tally: KeptFraction, start: int = 0):
    """Every SparseMLP computes only the neurons `choose_mask(mlp, x)` keeps. With `start`, the first `start`
    positions of every sequence (a prompt) are computed densely and not counted; masks cover the rest."""

    def masked(mlp, x):
        keep = choose_mask(mlp, x)
        if keep is None:  # no mask for this layer (e.g. layer 0 under lookahead): dense
            return mlp.dense(x)
        tally.add(keep)
        return _masked(mlp, x, keep)

    def override(mlp, x):
        if not start:
            return masked(mlp, x)
        return torch.cat([mlp.dense(x[:, :start]), masked(mlp, x[:, start:])], dim=1)

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


def best_mask(keep_fraction: float):
    """Per token, the ceil(keep_fraction * m) neurons of largest output contribution (active ones only): the
    best any per-token mask skipping that fraction could do (known only after computing every neuron)."""

    def choose(mlp, x):
        gate, up, _ = mlp.projections()
        a = mlp.activation(gate(x), up(x))
        k = max(1, min(a.shape[-1], math.ceil(keep_fraction * a.shape[-1])))
        importance = neuron_contributions(mlp, a)
        keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, importance.topk(k, dim=-1).indices, True)
        return keep & (a != 0)

    return choose


@dataclass(frozen=True)
class PromptMasks:
    """Prompt-derived masks: the first `fraction` of each sequence is the prompt. Each layer scores a neuron by
    its contribution summed over the prompt's tokens (its share of the prompt's MLP output mass) and keeps, per
    sequence, the top `keep` fraction of neurons (exactly that many: keep=1 is dense), or (with `mass`) the fewest
    that carry that share of the prompt's mass, never one silent over the whole prompt."""

    fraction: float = 0.5
    keep: float | None = 0.5
    mass: float | None = None

    def prompt_len(self, seq_len: int) -> int:
        """Prompt tokens of a `seq_len`-token sequence (at least one, and at least one token after it)."""
        return min(seq_len - 1, max(1, round(self.fraction * seq_len)))

    def select(self, prompt_mass: torch.Tensor) -> torch.Tensor:
        """[..., m] summed prompt contributions -> [..., m] bool: the neurons kept for the continuation."""
        m = prompt_mass.shape[-1]
        order = prompt_mass.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(m, device=order.device).expand_as(order))
        if self.mass is None:
            return rank < max(1, min(m, math.ceil((self.keep or 0.0) * m)))
        ranked = prompt_mass.gather(-1, order).cumsum(-1)
        k = (ranked < self.mass * ranked[..., -1:]).sum(-1, keepdim=True) + 1  # the fewest reaching the target
        return (rank < k) & (prompt_mass > 0)

    def describe(self) -> dict:
        return {"prompt_fraction": self.fraction, **({"mass": self.mass} if self.mass is not None
                                                      else {"keep": self.keep})}


@contextlib.contextmanager
def prompt_override(model, masks: PromptMasks, tally: KeptFraction):
    """Every SparseMLP runs the prompt positions densely and the rest of each sequence with only the neurons
    `masks` derives from the prompt's activations (one mask per sequence and layer). Equivalent to a dense
    prefill followed by masked decoding: attention is causal, so the prompt never sees what comes after it."""

    def override(mlp, x):
        p = masks.prompt_len(x.shape[1])
        gate, up, down = mlp.projections()
        a = mlp.activation(gate(x[:, :p]), up(x[:, :p]))
        rest = x[:, p:]
        keep = masks.select(neuron_contributions(mlp, a).sum(dim=1))[:, None, :].expand(-1, rest.shape[1], -1)
        tally.add(keep)
        return torch.cat([mlp.compensate(down(a)), _masked(mlp, rest, keep)], dim=1)

    with patched_mlps(model, override=override):
        yield


def continuation_batches(batches: list[dict], masks: PromptMasks) -> list[dict]:
    """The same batches labelled on the continuation only: the tokens predicted from a position after the prompt
    (the first continuation token is predicted from the prompt's last position, computed densely)."""
    out = []
    for batch in batches:
        labels = batch["labels"].clone()
        labels[:, : masks.prompt_len(labels.shape[1]) + 1] = -100
        out.append({**batch, "labels": labels})
    return out


@torch.no_grad()
def prompt_eval(model, batches: list[dict], device, masks: PromptMasks, exact_zeros: bool,
                silu_active_fraction: float = 0.3, all_reduce=None) -> dict:
    """{'prompt', 'continuation_dense', 'continuation_oracle', 'continuation_best'}: perplexity over the
    continuation tokens with prompt-derived masks, and on the same tokens (prompt dense each time) with every
    neuron, with the truly active neurons, and with the best per-token masks at the prompt masks' skipped
    fraction."""
    cont = continuation_batches(batches, masks)
    start = masks.prompt_len(cont[0]["labels"].shape[1]) if cont else 0

    def perplexity() -> float:
        return evaluate(model, cont, None, device, all_reduce=all_reduce)["perplexity"]

    out = {"continuation_dense": {"perplexity": perplexity(), "sparsity": 0.0}}
    tally = KeptFraction()
    with prompt_override(model, masks, tally):
        out["prompt"] = {"perplexity": perplexity(), "sparsity": tally.sparsity(all_reduce), **masks.describe()}
    tally = KeptFraction()
    with mlp_override(model, oracle_mask(exact_zeros, silu_active_fraction), tally, start=start):
        out["continuation_oracle"] = {"perplexity": perplexity(), "sparsity": tally.sparsity(all_reduce)}
    tally = KeptFraction()
    with mlp_override(model, best_mask(1.0 - (out["prompt"]["sparsity"] or 0.0)), tally, start=start):
        out["continuation_best"] = {"perplexity": perplexity(), "sparsity": tally.sparsity(all_reduce)}
    return out


@contextlib.contextmanager
def head_masks(model, bank: PredictorBank, tally: KeptFraction | None = None,
               kv_tally: KeptFraction | None = None):
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
                 silu_active_fraction: float = 0.3, all_reduce=None, prompt: PromptMasks | None = None) -> dict:
    """{mode: {'perplexity', 'sparsity'}} for every mode that applies (`prompt`: the prompt-mask modes, see
    `prompt_eval`). With several processes, `all_reduce` (a sum over ranks) makes every figure one over all ranks'
    batches, not this rank's."""
    batches = list(batches)

    def perplexity() -> float:
        return evaluate(model, batches, None, device, all_reduce=all_reduce)["perplexity"]

    out = {"dense": {"perplexity": perplexity(), "sparsity": 0.0}}
    tally = KeptFraction()
    with mlp_override(model, oracle_mask(exact_zeros, silu_active_fraction), tally):
        out["oracle"] = {"perplexity": perplexity(), "sparsity": tally.sparsity(all_reduce)}
    if bank is not None:
        bank.bind(model)
        tally, scores = KeptFraction(), MaskRecall(exact_zeros, silu_active_fraction)
        with mlp_override(model, scores.scored(predicted_mask(bank)), tally):
            out["predicted"] = {"perplexity": perplexity(), "sparsity": tally.sparsity(all_reduce),
                                **scores.summary(all_reduce)}
        if bank.heads is not None:
            for mode in ("kv_written", "kv_skipped"):
                heads, kv = KeptFraction(), KeptFraction() if mode == "kv_skipped" else None
                with head_masks(model, bank, tally=heads, kv_tally=kv), head_skipping(model, mode):
                    out[f"heads_{mode}"] = {"perplexity": perplexity(), "sparsity": heads.sparsity(all_reduce)}
                if mode == "kv_skipped":  # what an engine can leave out of the cache: whole KV heads only
                    out[f"heads_{mode}"].update(kv_policy="per KV head: an entry is skipped only when every query "
                                                "head sharing it is dropped", kv_sparsity=kv.sparsity(all_reduce))
    if prompt is not None:
        out.update(prompt_eval(model, batches, device, prompt, exact_zeros, silu_active_fraction, all_reduce))
    return out
