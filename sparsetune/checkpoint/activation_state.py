"""Per-layer activation state as a checkpoint part: what calibration computed for the activations (CATS
thresholds fitted at the start of a run), saved with every checkpoint and put back on resume, export and eval.

The recipe says what the run is asked to do; this file says what it computed. (Checkpoints written before this part
existed carry CATS thresholds inside their recipe.yaml instead; those are read once from there, with a notice.)
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsetune.surgery.relufy import activation_spec, relufy

STATE_FILE = "activation_state.json"


def save_activation_state(model, folder: Path) -> None:
    (Path(folder) / STATE_FILE).write_text(json.dumps({"activation": activation_spec(model)}, indent=1))


def load_activation_state(model, folder: Path) -> bool:
    """Put the saved per-layer state on `model`'s activations; False when `folder` has none."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return False
    relufy(model, json.loads(path.read_text())["activation"])
    return True
