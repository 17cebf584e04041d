"""Model surgery: swap the activation of every SwiGLU MLP, and undo it for export.

`SparseMLP` keeps the original projection modules under their original names, so the
model's state dict (and LoRA target names) are exactly those of the Hugging Face model.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn

from sparsetune.surgery.activations import MLPActivation, build_activation
from sparsetune.surgery.architectures import MLPLayout, layout_for
from sparsetune.recipe.schema import RelufySection


class ActivationSink(Protocol):
    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor) -> None: ...


class SparseMLP(nn.Module):
    """A SwiGLU MLP with a swappable activation that reports its activation once per forward."""

    def __init__(self, original: nn.Module, layout: MLPLayout, activation: MLPActivation, layer_idx: int):
        super().__init__()
        self.layout_names = (layout.gate, layout.up, layout.down)
        for name in self.layout_names:
            self.add_module(name, getattr(original, name))
        self.activation = activation
        self.layer_idx = layer_idx
        self.sink: ActivationSink | None = None
        # Dynamic-activation evaluation replaces the dense computation: override(mlp, x) -> output.
        self.override = None
        self.original_class = type(original)

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return tuple(getattr(self, n) for n in self.layout_names)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.override is not None:
            return self.override(self, x)
        gate_proj, up_proj, down_proj = self.projections()
        a = self.activation(gate_proj(x), up_proj(x))
        if self.sink is not None:
            self.sink.record(self.layer_idx, a, x)
        return down_proj(a)


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM under peft/DDP/compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DeepSpeed
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
            model = model.get_base_model()
        else:
            break
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    lm = base_causal_lm(model)
    return _get(lm, layout_for(lm.config.model_type).layers)


def relufy(model: nn.Module, cfg: RelufySection | dict) -> list[SparseMLP]:
    """Replace every SwiGLU MLP of `model` by a SparseMLP with the configured activation (in place).

    Raises SparsetuneError naming the model type when it has no known SwiGLU MLP.
    """
    lm = base_causal_lm(model)
    layout = layout_for(lm.config.model_type)
    mlps = []
    for idx, layer in enumerate(_get(lm, layout.layers)):
        current = getattr(layer, layout.mlp)
        if isinstance(current, SparseMLP):
            current.activation = build_activation(cfg, idx)
            mlps.append(current)
            continue
        sparse = SparseMLP(current, layout, build_activation(cfg, idx), idx)
        setattr(layer, layout.mlp, sparse)
        mlps.append(sparse)
    return mlps


def sparse_mlps(model: nn.Module) -> list[SparseMLP]:
    return [m for m in model.modules() if isinstance(m, SparseMLP)]


@contextlib.contextmanager
def overriding_mlps(model: nn.Module, override):
    """Within: every SparseMLP's forward is `override(mlp, x)` (dynamic-activation evaluation, sparse decoding)."""
    mlps = sparse_mlps(model)
    for m in mlps:
        m.override = override
    try:
        yield mlps
    finally:
        for m in mlps:
            m.override = None


def activation_spec(model: nn.Module) -> dict:
    """The model's activation as a `relufy` section dict (per-layer thresholds for cats)."""
    mlps = sparse_mlps(model)
    spec = mlps[0].activation.spec()
    if spec["activation"] == "cats":
        spec["thresholds"] = [m.activation.threshold for m in mlps]
    return spec


def restore_hf_mlps(model: nn.Module) -> None:
    """Put plain transformers MLP modules back (same weights), for saving as a plain HF model."""
    lm = base_causal_lm(model)
    layout = layout_for(lm.config.model_type)
    for layer in _get(lm, layout.layers):
        sparse = getattr(layer, layout.mlp)
        if not isinstance(sparse, SparseMLP):
            continue
        with torch.device("meta"):
            plain = sparse.original_class(lm.config)  # reads hidden_act / mlp_bias from the (updated) config
        for name in sparse.layout_names:
            setattr(plain, name, getattr(sparse, name))
        setattr(layer, layout.mlp, plain)
