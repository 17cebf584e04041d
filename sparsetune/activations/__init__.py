"""MLP activations, one module each (the protocol is in `base.py`).

Adding an activation is adding a file here: the recipe accepts its name, surgery builds it, checkpoints, exports,
eval and the engines' checks read what it declares, with no other edit (tests/activations proves it with a plugin
added from the test tree).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

from sparsetune.activations.base import MLPActivation

__all__ = ["MLPActivation", "activation_class", "activation_modules", "activation_names", "build_activation",
           "for_hidden_act"]

# The order the recipe reference lists them in; a plugin not named here follows, alphabetically.
_ORDER = ["silu", "relu", "shifted_relu", "fatrelu", "drelu", "relu2", "topk", "cats", "output_aware"]


@cache
def activation_modules() -> dict[str, ModuleType]:
    """name -> plugin module, for every module of this package (no torch import)."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "base"]
    names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    modules = {}
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        if module.ACTIVATION.name != name:
            raise ImportError(f"sparsetune/activations/{name}.py: ACTIVATION.name is {module.ACTIVATION.name!r}, "
                              "expected the module's name")
        modules[name] = module
    return modules


def activation_names() -> list[str]:
    return list(activation_modules())


def activation_class(name: str) -> type[MLPActivation]:
    return activation_modules()[name].ACTIVATION


def build_activation(cfg, layer: int = 0) -> MLPActivation:
    """The activation of decoder layer `layer` from a `relufy` section (or an export's stored spec, a dict)."""
    if isinstance(cfg, dict):
        from sparsetune.recipe.schema import relufy_config

        cfg = relufy_config(cfg)
    return activation_class(cfg.activation).from_config(cfg, layer)


def for_hidden_act(hidden_act: str | None) -> str | None:
    """The activation a plain model folder's `hidden_act` (transformers' name) computes, or None."""
    for name, module in activation_modules().items():
        cls = module.ACTIVATION
        if hidden_act is not None and hidden_act in (cls.hf_hidden_act, *cls.hf_aliases):
            return name
    return None


def hidden_act_names() -> list[str]:
    return [n for m in activation_modules().values() for n in (m.ACTIVATION.hf_hidden_act, *m.ACTIVATION.hf_aliases)
            if n]
