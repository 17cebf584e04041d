"""The base model a LoRA checkpoint needs, recorded by hash: a LoRA checkpoint holds only the adapter, so the
weights it is exported or resumed with are those of `model.path` at that time. The checkpoint records the sha256
of the base's weight and config files when the run starts; export, eval and resume refuse a base that changed
(an export written over it, a re-downloaded file) instead of merging the adapter into other weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sparsetune.checkpoint.state import is_lora_checkpoint
from sparsetune.errors import SparsetuneError
from sparsetune.sources.loading import ALIASES, alias_file

BASE_FILE = "base_model.json"
_WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "config.json")


def _local_base(model_path: str) -> Path | None:
    path = Path(model_path)
    if path.exists():
        return path
    return alias_file(model_path) if model_path in ALIASES else None  # None: a hub id (model.revision pins it)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def base_fingerprint(model_path: str) -> dict | None:
    """{"path", "sha256": {file: digest}} of a local base model (a folder's weights and config, or a file), or
    None for a hub id."""
    base = _local_base(model_path)
    if base is None:
        return None
    files = [base] if base.is_file() else sorted({f for pattern in _WEIGHTS for f in base.glob(pattern)})
    return {"path": str(base.resolve()), "sha256": {f.name: _digest(f) for f in files}}


def write_base_fingerprint(folder: Path, fingerprint: dict | None) -> None:
    if fingerprint is not None:
        (folder / BASE_FILE).write_text(json.dumps(fingerprint, indent=1))


def check_base_unchanged(ckpt: Path, model_path: str, now: dict | None = None) -> None:
    """Refuse (one line) when the base model of a LoRA checkpoint is not the one it was trained on. `now`: the
    base's fingerprint when the caller has already computed it (hashing a large base twice is slow)."""
    recorded_file = ckpt / BASE_FILE
    if not recorded_file.is_file():
        return  # a full fine-tune (its checkpoints hold every weight), or a hub base (model.revision pins it)
    recorded = json.loads(recorded_file.read_text())
    now = now if now is not None else base_fingerprint(model_path)
    what = "the LoRA checkpoint" if is_lora_checkpoint(ckpt) else "the checkpoint (model frozen)"
    if now is None:
        raise SparsetuneError(f"{what} {ckpt} needs its base model {recorded['path']}, which is gone; "
                              "restore it at model.path")
    changed = sorted(name for name in set(recorded["sha256"]) | set(now["sha256"])
                     if recorded["sha256"].get(name) != now["sha256"].get(name))
    if changed:
        raise SparsetuneError(
            f"{what} {ckpt} was trained on the base model {recorded['path']}, which changed since "
            f"({', '.join(changed[:3])}: sha256 differs from the one recorded in {BASE_FILE}); restore that base "
            "(e.g. re-export it from its own run into another folder), or the run would go on from other weights")


def run_base_fingerprint(recipe, resume_from: Path | None) -> dict | None:
    """A new or resumed run's base-model part: the fingerprint of the base model a run does not change and restores
    from model.path on resume (a LoRA run's base; a train.freeze_model run's model, which sharded resumes do not load
    back), checked against the checkpoint it resumes from; None for a full fine-tune (its checkpoints hold all the
    weights it trains)."""
    if recipe.peft.method != "lora" and not recipe.train.freeze_model:
        return None
    fingerprint = base_fingerprint(recipe.model.path)
    if resume_from is not None:
        check_base_unchanged(resume_from, recipe.model.path, fingerprint)
    return fingerprint
