"""Dropped-activation compensation (R-Sparse, SPON): what a sparse MLP drops is not zero on average, so each layer
adds back its mean, a bias on the MLP output fitted in closed form on calibration tokens and free at inference.

Layer l drops d = a_ref - a per token, where `a` is what it computes and `a_ref` the elementwise activation its zeros
are cut from (its plugin's `undropped`: SiLU for cats / topk / output_aware, ReLU for fatrelu). The constant b that
minimizes the mean ||W_down d - b||^2 over the calibration tokens is b = W_down mean(d), and it removes the share
||b||^2 / mean ||W_down d||^2 of that squared error (reported as `removed`). All layers are fitted in one pass on the
model as it computes (without a compensation), so each layer sees the inputs of uncompensated layers below it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sparsetune.activations import activation_class
from sparsetune.errors import SparsetuneError
from sparsetune.sparsity.cett import readable_down_weight
from sparsetune.surgery.sparse_mlp import (  # apply_compensation lives with SparseMLP (surgery puts a stored bias back)
    apply_compensation,  # noqa: F401
    measuring_pass,
    patched_mlps,
    sparse_mlps,
)


def undropped_activation(activation):
    """The elementwise activation `activation`'s zeros are cut from, or None when it drops nothing of one."""
    name = activation.undropped  # an instance may say (output_aware's form)
    return None if name is None else activation_class(name)()


class _DropSink:
    """Per layer: the sum over real tokens of the dropped activation d, and of ||W_down d||^2."""

    def __init__(self, mlps, weights):
        self.mlps = {m.layer_idx: m for m in mlps}
        self.weights = {m.layer_idx: w for m, w in zip(mlps, weights)}
        self.reference = {m.layer_idx: undropped_activation(m.activation) for m in mlps}
        self.sums: dict[int, torch.Tensor] = {}
        self.squares: dict[int, float] = {}
        self.tokens: dict[int, int] = {}
        self.mask: torch.Tensor | None = None

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate: torch.Tensor) -> None:
        up = self.mlps[layer].projections()[1](mlp_input)
        dropped = (self.reference[layer](gate, up) - activation).float()
        rows = dropped[self.mask.bool()] if self.mask is not None else dropped.reshape(-1, dropped.shape[-1])
        out = rows @ self.weights[layer].float().t()
        self.sums[layer] = self.sums.get(layer, 0) + rows.sum(0)
        self.squares[layer] = self.squares.get(layer, 0.0) + float(out.pow(2).sum())
        self.tokens[layer] = self.tokens.get(layer, 0) + rows.shape[0]


@dataclass
class CompensationFit:
    biases: list[torch.Tensor]  # per layer, [hidden] float32
    removed: list[float]  # per layer, the share of the dropped part's squared output error the bias removes
    tokens: int


@torch.no_grad()
def fit_compensation(model, batches: Iterable[dict], device) -> CompensationFit:
    """Each layer's compensation bias b = W_down mean(a_ref - a) over the real tokens of `batches`, the model
    computing as it is with no compensation. Identical on every rank given identical batches."""
    mlps = sparse_mlps(model)
    missing = [m.activation.name for m in mlps if undropped_activation(m.activation) is None]
    if missing:
        raise SparsetuneError(f"compensation: relufy.activation={missing[0]} is not cut from an elementwise "
                              "activation (cats, topk, output_aware, fatrelu are); nothing to compensate")
    weights = [readable_down_weight(m) for m in mlps]
    if any(w is None for w in weights):
        raise SparsetuneError("compensation.enabled needs the MLP weights unsharded (not fsdp / zero3)")
    saved = [m.compensation for m in mlps]
    sink = _DropSink(mlps, weights)
    try:
        for m in mlps:
            m.compensation = None
        with patched_mlps(model, override=None):
            measuring_pass(model, batches, device, sink)
    finally:
        for m, c in zip(mlps, saved):
            m.compensation = c
    biases, removed = [], []
    for m, w in zip(mlps, weights):
        n = max(1, sink.tokens[m.layer_idx])
        b = w.float() @ (sink.sums[m.layer_idx] / n)
        biases.append(b)
        total = sink.squares[m.layer_idx] / n
        removed.append(float(b.pow(2).sum()) / total if total > 0 else 0.0)
    return CompensationFit(biases, removed, sink.tokens[mlps[0].layer_idx])


COMPENSATION_BIAS = "down_proj.bias"  # sparsetune.json's `compensation_in` when an export holds it there


def bias_to_compensation(model) -> None:
    """Move the compensation an export holds as each down projection's bias (export/exporter.fold_compensation)
    back to the SparseMLPs' compensation, which computes the same and which eval can drop or replace."""
    for m in sparse_mlps(model):
        down = m.projections()[2]
        if down.bias is not None:
            m.compensation = down.bias.detach().float().clone()
            down.register_parameter("bias", None)
