"""Per-layer activation state as a checkpoint part: what a run computed for its activations (CATS thresholds
calibrated at the start, per-layer FATReLU / CATS thresholds fitted by the `thresholds` conversion), saved with every
checkpoint as the activation's full spec and put back by the builder (models/build.py) on resume, export and eval.

The recipe says what the run is asked to do; this file says what it computed. Every checkpoint of this layout
(checkpoint/store.py `LAYOUT`) holds it.
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
    relufy(model, json.loads(path.read_text())["activation"], source=str(path), section="activation")
    return True
