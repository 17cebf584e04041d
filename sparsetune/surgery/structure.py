"""Where things are in a (wrapped) causal LM: the transformers model under peft / DDP / DeepSpeed / compile
wrappers and its decoder layers (its SparseMLPs: `sparse_mlp.sparse_mlps`)."""

from __future__ import annotations

from torch import nn

from sparsetune.surgery.architectures import layout_for


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
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
    return get_submodule(lm, layout_for(lm.config.model_type).layers)


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's MLP module, whatever it is (the model's own class, or a SparseMLP after surgery)."""
    lm = base_causal_lm(model)
    layout = layout_for(lm.config.model_type)
    return [getattr(layer, layout.mlp) for layer in get_submodule(lm, layout.layers)]



def readable_weight(linear: nn.Module):
    """The weight a linear layer computes with, as a full tensor: a peft-wrapped layer's base weight plus its active
    LoRA adapters' delta. None where only a shard is here: an FSDP2 DTensor (outside its layer's forward, which
    gathers it), a DeepSpeed ZeRO-3 partition (outside the forward of its leaf module, which gathers it)."""
    from torch.distributed.tensor import DTensor

    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    weight = base.weight
    status = getattr(weight, "ds_status", None)  # ZeroParamStatus under ZeRO-3
    if isinstance(weight, DTensor) or (status is not None and status.name != "AVAILABLE") or weight.numel() == 0:
        return None
    if base is linear or getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False):
        return weight
    for name in getattr(linear, "active_adapters", []):
        if name in getattr(linear, "lora_A", {}):
            weight = weight + linear.get_delta_weight(name)
    return weight
