"""Reading a "with code" export (export/targets/hf_code.py) as its base architecture, running none of its code."""

from __future__ import annotations

import json
from pathlib import Path

PREFIX = "sparsetune_"  # model_type = PREFIX + the base architecture's


def is_code_export(config: dict) -> bool:
    return str(config.get("model_type", "")).startswith(PREFIX) and "sparsetune_base_model_type" in config


def base_config(folder: Path):
    """The base architecture's config of a "with code" export (what sparsetune loads it as, running none of the
    folder's code), or None for any other folder."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the loader reports an unreadable config.json in its own words
    if not isinstance(config, dict) or not is_code_export(config):
        return None
    from transformers import AutoConfig

    base = config["sparsetune_base_model_type"]
    plain = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type")
             and not k.startswith(PREFIX)}
    return AutoConfig.for_model(base, **plain)
