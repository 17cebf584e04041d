"""Named launch presets shipped with sparsetune (accelerate config + DeepSpeed JSON where needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparsetune.errors import SparsetuneError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    strategy: str          # ddp | fsdp | deepspeed
    zero_stage: int | None = None
    offload: bool = False

    @property
    def config_file(self) -> Path:
        return PRESET_DIR / f"{self.name}.yaml"

    @property
    def deepspeed_file(self) -> Path | None:
        return PRESET_DIR / f"{self.name}.json" if self.strategy == "deepspeed" else None

    @property
    def shards_parameters(self) -> bool:
        return self.strategy == "fsdp" or (self.zero_stage or 0) >= 3


PRESETS = {p.name: p for p in (
    Preset("ddp", "ddp"),
    Preset("fsdp", "fsdp"),
    Preset("zero2", "deepspeed", 2),
    Preset("zero3", "deepspeed", 3),
    Preset("zero3_offload", "deepspeed", 3, offload=True),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SparsetuneError(f"--launch {name}: unknown preset (known: {', '.join(PRESETS)})")
    return PRESETS[name]
