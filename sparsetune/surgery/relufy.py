"""Model surgery: swap the activation of every SwiGLU MLP for a SparseMLP, and undo it for export."""

from __future__ import annotations

import torch
from pydantic import ValidationError
from torch import nn

from sparsetune.activations import activation_class, build_activation
from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import ACTIVATIONS, RelufyConfig, relufy_config
from sparsetune.surgery.architectures import layout_for
from sparsetune.surgery.sparse_mlp import SparseMLP, apply_compensation, sparse_mlps
from sparsetune.surgery.structure import base_causal_lm, get_submodule


def relufy(model: nn.Module, cfg: RelufyConfig | dict, source: str | None = None,
           section: str = "relufy") -> list[SparseMLP]:
    """Replace every SwiGLU MLP of `model` by a SparseMLP with the configured activation (in place).

    A spec dict's `compensation` (per-layer output biases, from `activation_spec`) is put on the MLPs too.
    Per-layer values must match the model: one per decoder layer, a per-neuron list as wide as the MLP, a
    compensation bias as wide as its output. Raises a SparsetuneError naming the key (`section`.key, in the file
    `source` when the section was read from one) or the model type when it has no known SwiGLU MLP.
    """
    compensation = None
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        compensation = cfg.pop("compensation", None)
        try:
            cfg = relufy_config(cfg)
        except ValidationError as exc:
            raise SparsetuneError(describe_spec_error(exc, source, section)) from None
    lm = base_causal_lm(model)
    layout = layout_for(lm.config.model_type)
    layers = list(get_submodule(lm, layout.layers))
    where = f"{source}: key" if source else "recipe key"
    _check_per_layer(cfg, [getattr(layer, layout.mlp) for layer in layers], layout, where, section)
    mlps = []
    for idx, layer in enumerate(layers):
        current = getattr(layer, layout.mlp)
        if isinstance(current, SparseMLP):
            current.activation = build_activation(cfg, idx)
            mlps.append(current)
            continue
        sparse = SparseMLP(current, layout, build_activation(cfg, idx), idx)
        setattr(layer, layout.mlp, sparse)
        mlps.append(sparse)
    if compensation is not None:
        _check_widths(compensation, where, f"{section}.compensation", [_width(m, layout.down) for m in mlps],
                      "the MLP output (hidden size)", "one bias per output")
        apply_compensation(model, compensation)
    return mlps


def _width(mlp: nn.Module, projection: str) -> int | None:
    """The output width of one projection of an MLP (gate: its neurons; down: the hidden size), None if unknown."""
    return getattr(getattr(mlp, projection, None), "out_features", None)


def _check_widths(values: list, where: str, key: str, widths: list[int | None], what: str, unit: str) -> None:
    """`values` (recipe key `key`, `where` says in which file) holds one entry per decoder layer; a list entry is as
    wide as the layer's `what`."""
    if len(values) != len(widths):
        raise SparsetuneError(f"{where} '{key}' has {_count(len(values))} but the model has {len(widths)} decoder "
                              f"layers{_advice(where, 'one per layer')}")
    for idx, (value, width) in enumerate(zip(values, widths)):
        if isinstance(value, list) and width is not None and len(value) != width:
            raise SparsetuneError(f"{where} '{key}[{idx}]' has {_count(len(value))} but {what} of layer {idx} has "
                                  f"{width}{_advice(where, unit)}")


def _advice(where: str, unit: str) -> str:
    """What to write instead, for a recipe (a file sparsetune wrote says itself how to make it again)."""
    return f"; give {unit}" if where == "recipe key" else ""


def _count(n: int) -> str:
    return f"{n} value" if n == 1 else f"{n} values"


def _check_per_layer(cfg: RelufyConfig, mlps: list[nn.Module], layout, where: str, section: str) -> None:
    """Every per-layer key of the activation (thresholds, output_aware's per-neuron scales) that is given holds one
    value per decoder layer of this model, and a per-neuron value is as wide as the layer's MLP."""
    neurons = [_width(m, layout.gate) for m in mlps]
    for key in activation_class(cfg.activation).per_layer_keys:
        values = getattr(cfg, key, None)
        if values:  # empty or absent: not given (fitted later)
            _check_widths(values, where, f"{section}.{key}", neurons, "the MLP (intermediate size)",
                          "one per neuron")


def describe_spec_error(exc: ValidationError, source: str | None, section: str) -> str:
    """One line naming every bad key of a stored relufy section (an export's `load_activation`, a checkpoint's
    activation state) read from `source`."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        activation = loc.pop(0) if loc and loc[0] in ACTIVATIONS else None
        key = ".".join([section, *loc])
        kind = err["type"]
        if kind == "union_tag_invalid":
            ctx = err.get("ctx", {})
            parts.append(f"key '{section}.activation' = {ctx.get('tag')!r} is not allowed; expected "
                         f"{ctx.get('expected_tags')}")
        elif kind == "union_tag_not_found":
            parts.append(f"key '{section}.activation' is missing")
        elif kind == "missing":
            parts.append(f"key {key!r} is missing")
        elif kind == "extra_forbidden":
            parts.append(f"key {key!r} is not a key of activation {activation!r}")
        elif kind == "value_error":  # a validator's own words name the value (and a section-wide one, its key)
            msg = err["msg"].removeprefix("Value error, ").replace("relufy.", f"{section}.")
            parts.append(msg if section in msg else f"key {key!r}: {msg}")
        else:
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 80 else shown[:80] + " ..."
            parts.append(f"key {key!r}: {err['msg']} (got {shown})")
    return (f"{source}: " if source else "") + "; ".join(parts)


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
