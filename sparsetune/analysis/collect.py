"""One dense pass over held-out batches that keeps what every analysis needs: per layer, the MLP activation of
every token (through the SparseMLPs' sink) and each attention head's output norm (a hook before o_proj).

No extra forward is run for bookkeeping: the same pass gives the held-out perplexity. Everything is kept on the
CPU in float32 for the sampled sequences only (batches x batch size x seq_len tokens; SmolLM2-135M at 8 x 256
tokens: 30 layers x 2048 tokens x 1536 neurons, 377 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsetune.evaluation.perplexity import evaluate
from sparsetune.predictors.labels import head_norms
from sparsetune.surgery.sparse_mlp import patched_mlps, sparse_mlps
from sparsetune.surgery.structure import base_causal_lm, decoder_layers


@dataclass
class Collection:
    """What one dense pass over `token_ids` saw."""

    token_ids: torch.Tensor  # [N, T] int64
    activations: list[torch.Tensor]  # per layer [N, T, m] float32: a = act(gate) * up, before down_proj
    down_weights: list[torch.Tensor]  # per layer [d, m] float32 (nn.Linear layout)
    head_norms: list[torch.Tensor] | None  # per layer [N, T, heads] float32: each head's output norm, before o_proj
    exact_zeros: bool  # the activation has exact zeros (ReLU family)
    activation: str
    perplexity: float

    @property
    def num_layers(self) -> int:
        return len(self.activations)

    def down_norms(self, layer: int) -> torch.Tensor:
        """||W_down[:, j]|| for every neuron j of `layer`."""
        return self.down_weights[layer].norm(dim=0)


class _ActivationSink:
    """A SparseMLP sink keeping each layer's activation of every batch, on the CPU."""

    def __init__(self, num_layers: int):
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate: torch.Tensor) -> None:
        self.parts[layer].append(activation.detach().float().cpu())


def _head_hooks(model, parts: list[list[torch.Tensor]]) -> list:
    """Pre-hooks on every layer's o_proj: the per-head attention output before it is mixed, as norms."""
    num_heads = base_causal_lm(model).config.num_attention_heads
    handles = []
    for idx, layer in enumerate(decoder_layers(model)):
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if o_proj is None:  # an attention module without o_proj: no head figures
            for h in handles:
                h.remove()
            return []

        def grab(module, args, idx=idx):
            parts[idx].append(head_norms(args[0].detach().float(), num_heads).cpu())

        handles.append(o_proj.register_forward_pre_hook(grab))
    return handles


@torch.no_grad()
def collect(model, batches: list[dict], device) -> Collection:
    """Run `model` (with SparseMLPs, on `device`) densely over `batches` once and keep what the analyses read."""
    mlps = sparse_mlps(model)
    sink = _ActivationSink(len(mlps))
    heads: list[list[torch.Tensor]] = [[] for _ in mlps]
    handles = _head_hooks(model, heads)
    try:
        with patched_mlps(model, sink=sink):
            ppl = evaluate(model, batches, None, device)["perplexity"]
    finally:
        for h in handles:
            h.remove()
    return Collection(
        token_ids=torch.cat([b["input_ids"] for b in batches]),
        activations=[torch.cat(p) for p in sink.parts],
        down_weights=[m.projections()[2].weight.detach().float().cpu() for m in mlps],
        head_norms=[torch.cat(p) for p in heads] if handles else None,
        exact_zeros=mlps[0].activation.exact_zeros,
        activation=mlps[0].activation.name,
        perplexity=ppl,
    )
