"""MLP activations, one module each (the protocol is in `base.py`).

Adding an activation is adding a file here (or `register(module)` for one defined elsewhere, as the test tree
does): the recipe accepts its name, surgery builds it, checkpoints, the lifecycle's calibration and threshold fits,
exports and eval read what it declares, with no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from types import ModuleType

from sparsetune.activations.base import MLPActivation, quantile_threshold
from sparsetune.errors import SparsetuneError

__all__ = ["MLPActivation", "activation_class", "activation_modules", "activation_names", "build_activation",
           "on_register", "quantile_threshold", "register"]

# The order the recipe reference lists them in; a plugin not named here follows, alphabetically.
_ORDER = ["silu", "relu", "shifted_relu", "fatrelu", "drelu", "relu2", "topk", "cats", "output_aware"]
_MODULES: dict[str, ModuleType] = {}
_LISTENERS: list[Callable[[], None]] = []


def _checked(name: str, module: ModuleType) -> ModuleType:
    if module.ACTIVATION.name != name:
        raise ImportError(f"activation plugin {module.__name__}: ACTIVATION.name is {module.ACTIVATION.name!r}, "
                          f"expected {name!r}")
    return module


def activation_modules() -> dict[str, ModuleType]:
    """name -> plugin module, for every module of this package and every registered one (no torch import)."""
    if not _MODULES:
        names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "base"]
        names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
        for name in names:
            _MODULES[name] = _checked(name, importlib.import_module(f"{__name__}.{name}"))
    return _MODULES


def register(module: ModuleType) -> None:
    """Add an activation plugin defined outside this package (a module with `Config` and `ACTIVATION`, documented
    by its docstring); whatever was built from the list of activations (the recipe schema) is rebuilt."""
    activation_modules()[module.ACTIVATION.name] = _checked(module.ACTIVATION.name, module)
    for listener in _LISTENERS:
        listener()


def unregister(name: str) -> None:
    """Remove a registered plugin again (tests)."""
    activation_modules().pop(name, None)
    for listener in _LISTENERS:
        listener()


def on_register(listener: Callable[[], None]) -> None:
    """Call `listener` whenever the plugins change (the recipe schema rebuilds its relufy union)."""
    _LISTENERS.append(listener)


def activation_names() -> list[str]:
    return list(activation_modules())


def activation_class(name: str) -> type[MLPActivation]:
    return activation_modules()[name].ACTIVATION


def section(value: dict):
    """A `relufy` section validated by its own plugin's Config (the tag `activation`, relu when absent): what the
    recipe schema's union does for one section, without it."""
    name = value.get("activation", "relu")
    module = activation_modules().get(name)
    if module is None:
        raise SparsetuneError(f"activation {name!r} is not one of {', '.join(activation_names())}")
    return module.Config.model_validate(value)


def build_activation(cfg, layer: int = 0) -> MLPActivation:
    """The activation of decoder layer `layer` from a `relufy` section (or an export's stored spec, a dict)."""
    if isinstance(cfg, dict):
        cfg = section(cfg)
    return activation_class(cfg.activation).from_config(cfg, layer)
