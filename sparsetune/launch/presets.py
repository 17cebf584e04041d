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


_STRATEGIES = {"MULTI_GPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}


def _read_preset(config: Path) -> Preset:
    """A preset from its files: the accelerate config says the strategy, the DeepSpeed JSON the ZeRO stage."""
    import json

    import yaml

    kind = yaml.safe_load(config.read_text()).get("distributed_type")
    strategy = _STRATEGIES[kind]
    if strategy != "deepspeed":
        return Preset(config.stem, strategy)
    zero = json.loads(config.with_suffix(".json").read_text()).get("zero_optimization", {})
    return Preset(config.stem, strategy, int(zero.get("stage", 0)), offload="offload_param" in zero)


# Adding a preset is adding its files to presets/ (NAME.yaml, and NAME.json for DeepSpeed).
PRESETS = {p.name: p for p in map(_read_preset, sorted(PRESET_DIR.glob("*.yaml")))}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SparsetuneError(f"--launch {name}: unknown preset (known: {', '.join(PRESETS)})")
    return PRESETS[name]
