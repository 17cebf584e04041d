"""Per-layer activation state as a checkpoint part: what a run computed for its activations (CATS thresholds
calibrated at the start, per-layer FATReLU / CATS thresholds fitted by the `thresholds` conversion), saved with every
checkpoint as the activation's full spec and put back by the builder (models/build.py) on resume, export and eval.

The recipe says what the run is asked to do; this file says what it computed. Checkpoints written before this part
existed keep that state elsewhere, read once with a notice: CATS thresholds inside their recipe.yaml (checked by
checkpoint/resume.py), a conversion's thresholds in the `thresholds` component's thresholds.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsetune.surgery.relufy import activation_spec, relufy

STATE_FILE = "activation_state.json"
LEGACY_CONVERSION_FILE = "thresholds.json"  # the `thresholds` component's record (it held the thresholds before)


def save_activation_state(model, folder: Path) -> None:
    (Path(folder) / STATE_FILE).write_text(json.dumps({"activation": activation_spec(model)}, indent=1))


def load_activation_state(model, folder: Path, report=None) -> bool:
    """Put the saved per-layer state on `model`'s activations; False when `folder` has none."""
    path = Path(folder) / STATE_FILE
    if path.is_file():
        relufy(model, json.loads(path.read_text())["activation"], source=str(path), section="activation")
        return True
    legacy = Path(folder) / LEGACY_CONVERSION_FILE
    done = json.loads(legacy.read_text()).get("conversion") if legacy.is_file() else None
    if not done:
        return False
    if report is not None:
        report(f"{folder} keeps its fitted thresholds in {LEGACY_CONVERSION_FILE} (written by an older sparsetune); "
               "using them")
    from sparsetune.sparsity.thresholds import Conversion

    Conversion.from_json(done).apply(model)  # as the conversion put them on the model when it ran
    return True
