"""Export targets, one module each (the protocol is in `base.py`): `hf` (a plain Hugging Face folder), `hf_code`
(Hugging Face with its own modeling code), `powerinfer` (PowerInfer's GGUF beside the HF folder). `sparsetune
export RUN --out DIR --target NAME` picks one; without --target, `hf` when plain transformers computes the trained
model exactly, else `hf_code`."""

from __future__ import annotations

import importlib
import pkgutil

from sparsetune.errors import SparsetuneError
from sparsetune.export.targets.base import ExportJob, ExportTarget, HFForm

__all__ = ["ExportJob", "ExportTarget", "HFForm", "choose_target", "get_target", "register", "target_names",
           "unregister"]

_ORDER = ["hf", "hf_code", "powerinfer"]
_TARGETS: dict[str, type[ExportTarget]] = {}


def _targets() -> dict[str, type[ExportTarget]]:
    if not _TARGETS:
        names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "base"]
        names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
        for name in names:
            cls = importlib.import_module(f"{__name__}.{name}").TARGET
            _TARGETS[cls.name] = cls
    return _TARGETS


def register(cls: type[ExportTarget]) -> type[ExportTarget]:
    """Add a target defined outside this package (usable as a class decorator)."""
    _targets()[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _targets().pop(name, None)


def target_names() -> list[str]:
    return list(_targets())


def get_target(name: str) -> ExportTarget:
    if name not in _targets():
        raise SparsetuneError(f"--target {name!r} is not an export target; choose one of {', '.join(target_names())}")
    return _targets()[name]()


def choose_target(name: str | None, job: ExportJob) -> ExportTarget:
    """The target `name`, or without one the Hugging Face folder plain transformers runs when it can (`hf`), else
    the one with its own code (`hf_code`)."""
    if name is not None:
        return get_target(name)
    plain = get_target("hf")
    return plain if plain.refusal(job) is None else get_target("hf_code")
