"""Resume: choose the checkpoint, check the recipe against it, put the saved weights back."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from sparsetune.checkpoint.state import read_recipe
from sparsetune.checkpoint.store import CheckpointStore, checkpoint_problem
from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import Recipe

# Keys whose change would make the saved state meaningless (other weights, other data order).
FIXED_KEYS = (
    "model.path", "model.dtype", "model.revision", "relufy", "peft", "data.path", "data.name", "data.split",
    "data.text_field", "data.seq_len", "data.max_documents", "train.seed", "train.micro_batch_size",
    "train.grad_accum_steps", "output_dir",
)


def _flatten(obj, prefix: str = "") -> dict:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def recipe_changes(saved: Recipe, current: Recipe) -> tuple[list[str], list[str]]:
    """(errors, notices): changed keys that cannot be honoured, and those applied with a notice."""
    old, new = _flatten(saved.model_dump(mode="json")), _flatten(current.model_dump(mode="json"))
    errors, notices = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key == "description":
            continue
        change = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        if any(key == f or key.startswith(f + ".") for f in FIXED_KEYS):
            errors.append(change)
        else:
            notices.append(change)
    return errors, notices


def find_resume_checkpoint(run_dir: Path, explicit: str | None, report) -> Path | None:
    """The checkpoint to resume from: `explicit` (a checkpoint folder) or the newest complete one in run_dir."""
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise SparsetuneError(f"--resume {explicit}: no such checkpoint folder")
        problem = checkpoint_problem(path)
        if problem:
            raise SparsetuneError(f"--resume {explicit}: checkpoint is not usable: {problem}")
        return path
    return CheckpointStore(run_dir).latest_complete(report=report)


def check_recipe(ckpt: Path, current: Recipe, report) -> None:
    saved = read_recipe(ckpt)
    if current.relufy.activation == "cats" and current.relufy.thresholds is None:
        current.relufy.thresholds = saved.relufy.thresholds  # calibrated at the run's start: reuse them
    errors, notices = recipe_changes(saved, current)
    if errors:
        raise SparsetuneError(
            f"cannot resume from {ckpt}: the recipe changed where the checkpoint cannot follow ({'; '.join(errors)}); "
            "restore these keys or start a new run in another output_dir"
        )
    for change in notices:
        extra = " (the cosine LR schedule is re-stretched to the new length)" if change.startswith("train.max_steps") else ""
        report(f"resume: using the new value of {change}{extra}")


def read_weights(folder: Path) -> dict:
    """Every tensor of a folder's safetensors shards (a checkpoint's full, gathered weights)."""
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def load_model_weights(model, folder: Path, lora: bool) -> None:
    """Put a checkpoint's weights into the (surgery'd, possibly LoRA-wrapped) model in place."""
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state = read_weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained stores a tied output embedding once (as the input embedding)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SparsetuneError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
