"""The device `eval` and `export` run on: `auto` = the GPU when one is present, else the CPU."""

from __future__ import annotations

import torch

from sparsetune.errors import SparsetuneError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`; a CUDA device that is not there is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparsetuneError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SparsetuneError(f"--device {name}: no CUDA device is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SparsetuneError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise SparsetuneError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device
