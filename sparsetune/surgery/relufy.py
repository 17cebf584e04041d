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

    Raises SparsetuneError naming the model type when it has no known SwiGLU MLP.
    """
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
    return mlps


def activation_spec(model: nn.Module) -> dict:
    """The model's activation as a `relufy` section dict (per-layer thresholds for cats and per-layer fatrelu)."""
    mlps = sparse_mlps(model)
    spec = mlps[0].activation.spec()
    if "thresholds" in spec:
        spec["thresholds"] = [m.activation.threshold for m in mlps]
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
