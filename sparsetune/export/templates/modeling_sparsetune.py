# Written by sparsetune's export into a model folder whose trained MLP activation plain transformers cannot express.
# `AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)` runs this file: the base architecture named
# by `config.sparsetune_base_model_type`, with every decoder layer's MLP computing the trained activation from
# `config.sparsetune_activation` (its per-layer thresholds and scales) and, when the run fitted them, the
# dropped-activation compensation biases. Without trust_remote_code transformers refuses to load the folder instead of
# running the dense SiLU model. Self-contained: it needs transformers and torch, not sparsetune.
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

BASE_MODEL_TYPE = "llama"  # the exporter writes the base architecture's model_type here

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseLM = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])


class SparsetuneConfig(_BaseConfig):
    model_type = f"sparsetune_{BASE_MODEL_TYPE}"


def _layer(values, layer):
    return None if values is None else values[layer]


class _OnDevice:
    """A constant vector made on the device of its first use (the model is built on the meta device first)."""

    def __init__(self, values):
        self.values, self.tensor = values, None

    def on(self, like):
        if self.tensor is None or self.tensor.device != like.device:
            self.tensor = torch.tensor(self.values, dtype=torch.float32, device=like.device)
        return self.tensor


def _output_aware(spec, layer):
    threshold, scales = _layer(spec.get("thresholds"), layer), _layer(spec.get("scales"), layer)
    if threshold is None or scales is None or math.isnan(threshold):
        raise ValueError("sparsetune: this output_aware model has no fitted thresholds; it cannot be run exactly")
    elementwise = F.relu if spec.get("form", "silu") == "relu" else F.silu
    product = spec.get("score", "product") == "product"
    scale = _OnDevice(scales)

    def act(gate, up):
        dense = elementwise(gate) * up
        g, u = gate.detach().float(), up.detach().float()
        score = elementwise(g).abs() * (u.abs() if product else 1.0) * scale.on(g)
        return torch.where(score >= threshold, dense, torch.zeros_like(dense))

    return act


def _cats(spec, layer):
    threshold = _layer(spec["thresholds"], layer)

    def act(gate, up):
        a = F.silu(gate)
        return torch.where(a.abs() >= threshold, a, torch.zeros_like(a)) * up

    return act


def _fatrelu(spec, layer):
    threshold = _layer(spec.get("thresholds"), layer)
    threshold = spec["threshold"] if threshold is None else threshold

    def act(gate, up):
        return torch.where(gate >= threshold, gate, torch.zeros_like(gate)) * up

    return act


def _topk(spec, layer):
    fraction = spec["top_k_fraction"]

    def act(gate, up):
        dense = F.silu(gate) * up
        k = max(1, math.ceil(fraction * dense.shape[-1]))
        if k >= dense.shape[-1]:
            return dense
        idx = dense.abs().topk(k, dim=-1).indices
        return torch.zeros_like(dense).scatter(-1, idx, dense.gather(-1, idx))

    return act


def _shifted_relu(spec, layer):
    shift = spec["shift"]
    return lambda gate, up: F.relu(gate - shift) * up


ACTIVATIONS = {
    "silu": lambda spec, layer: (lambda gate, up: F.silu(gate) * up),
    "relu": lambda spec, layer: (lambda gate, up: F.relu(gate) * up),
    "relu2": lambda spec, layer: (lambda gate, up: torch.square(F.relu(gate)) * up),
    "drelu": lambda spec, layer: (lambda gate, up: F.relu(gate) * F.relu(up)),
    "shifted_relu": _shifted_relu,
    "fatrelu": _fatrelu,
    "cats": _cats,
    "topk": _topk,
    "output_aware": _output_aware,
}


class SparsetuneMLP(nn.Module):
    """The base MLP's projections under their own names (the weights load as they are), the trained activation,
    and the compensation bias (from the config, not a weight)."""

    def __init__(self, original: nn.Module, names: dict, activation, compensation):
        super().__init__()
        self.names = (names["gate"], names["up"], names["down"])
        for name in self.names:
            self.add_module(name, getattr(original, name))
        self.activation = activation
        self.compensation = None if compensation is None else _OnDevice(compensation)

    def forward(self, x):
        gate_proj, up_proj, down_proj = (getattr(self, n) for n in self.names)
        out = down_proj(self.activation(gate_proj(x), up_proj(x)))
        return out if self.compensation is None else out + self.compensation.on(out).to(out.dtype)


class SparsetuneForCausalLM(_BaseLM):
    config_class = SparsetuneConfig

    def __init__(self, config):
        super().__init__(config)
        spec, names = config.sparsetune_activation, config.sparsetune_mlp
        name = spec["activation"]
        if name not in ACTIVATIONS:
            raise ValueError(f"sparsetune: activation {name!r} has no code here; load the folder with "
                             "sparsetune.load_sparse_model")
        layers = self.get_submodule(names["layers"])
        for i, layer in enumerate(layers):
            mlp = SparsetuneMLP(getattr(layer, names["mlp"]), names, ACTIVATIONS[name](spec, i),
                                _layer(spec.get("compensation"), i))
            setattr(layer, names["mlp"], mlp)
