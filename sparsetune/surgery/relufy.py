"""Model surgery: swap the activation of every SwiGLU MLP for a SparseMLP, and undo it for export."""

from __future__ import annotations

import torch
from torch import nn

from sparsetune.activations import build_activation
from sparsetune.recipe.schema import RelufyConfig
from sparsetune.surgery.architectures import layout_for
from sparsetune.surgery.sparse_mlp import SparseMLP, sparse_mlps
from sparsetune.surgery.structure import base_causal_lm, get_submodule


def relufy(model: nn.Module, cfg: RelufyConfig | dict) -> list[SparseMLP]:
    """Replace every SwiGLU MLP of `model` by a SparseMLP with the configured activation (in place).

    A spec dict's `compensation` (per-layer output biases, from `activation_spec`) is put on the MLPs too.
    Raises SparsetuneError naming the model type when it has no known SwiGLU MLP.
    """
    compensation = None
    if isinstance(cfg, dict) and "compensation" in cfg:
        cfg = dict(cfg)
        compensation = cfg.pop("compensation")
    lm = base_causal_lm(model)
    layout = layout_for(lm.config.model_type)
    mlps = []
    for idx, layer in enumerate(get_submodule(lm, layout.layers)):
        current = getattr(layer, layout.mlp)
        if isinstance(current, SparseMLP):
            current.activation = build_activation(cfg, idx)
            mlps.append(current)
            continue
        sparse = SparseMLP(current, layout, build_activation(cfg, idx), idx)
        setattr(layer, layout.mlp, sparse)
        mlps.append(sparse)
    if compensation is not None:
        from sparsetune.sparsity.compensation import apply_compensation

        apply_compensation(model, compensation)
    return mlps


def activation_spec(model: nn.Module) -> dict:
    """The model's activation as a `relufy` section dict, with every layer's value of its per-layer keys (thresholds
    of cats / per-layer fatrelu / output_aware, output_aware's scales) and, when the model has one, every layer's
    compensation bias (`compensation`, which `relufy` puts back)."""
    mlps = sparse_mlps(model)
    spec = mlps[0].activation.spec()
    for key, attr in type(mlps[0].activation).per_layer_keys.items():
        if spec.get(key) is not None:
            spec[key] = [getattr(m.activation, attr) for m in mlps]
    if any(m.compensation is not None for m in mlps):
        spec["compensation"] = [m.compensation.detach().float().cpu().tolist() for m in mlps]
    return spec


def restore_hf_mlps(model: nn.Module) -> None:
    """Put plain transformers MLP modules back (same weights), for saving as a plain HF model."""
    lm = base_causal_lm(model)
    layout = layout_for(lm.config.model_type)
    for layer in get_submodule(lm, layout.layers):
        sparse = getattr(layer, layout.mlp)
        if not isinstance(sparse, SparseMLP):
            continue
        with torch.device("meta"):
            plain = sparse.original_class(lm.config)  # reads hidden_act / mlp_bias from the (updated) config
        for name in sparse.layout_names:
            setattr(plain, name, getattr(sparse, name))
        setattr(layer, layout.mlp, plain)
