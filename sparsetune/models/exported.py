"""Load a model exported by sparsetune (or any HF SwiGLU model) with its sparse activation in place."""

from __future__ import annotations

import json
from pathlib import Path

from sparsetune.errors import SparsetuneError
from sparsetune.models.loading import load_model
from sparsetune.surgery.relufy import relufy

SPEC_FILE = "sparsetune.json"
_HF_TO_ACTIVATION = {"silu": "silu", "swish": "silu", "relu": "relu", "relu2": "relu2"}


def activation_for_hf_config(config) -> dict:
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if act not in _HF_TO_ACTIVATION:
        raise SparsetuneError(
            f"model config hidden_act={act!r} has no sparsetune equivalent (known: {', '.join(_HF_TO_ACTIVATION)})"
        )
    return {"activation": _HF_TO_ACTIVATION[act]}


def load_activation_spec(folder: Path, config) -> dict:
    """The activation to apply on top of the folder's weights: from sparsetune.json, else from hidden_act."""
    spec_file = Path(folder) / SPEC_FILE
    if spec_file.is_file():
        return json.loads(spec_file.read_text())["load_activation"]
    return activation_for_hf_config(config)


def load_sparse_model(folder: str | Path, dtype: str = "float32"):
    """A transformers model from an export folder with sparsetune's SparseMLPs (exact activation,
    activation capture) in place. Works for drelu / topk / fatrelu exports that plain transformers
    cannot express."""
    model = load_model(str(folder), dtype)
    relufy(model, load_activation_spec(Path(folder), model.config))
    return model
