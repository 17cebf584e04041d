"""Resume: check the recipe against the checkpoint, put the saved weights back. (Which checkpoint a run resumes
from is the run folder's decision: training/run_folder.py.)"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from sparsetune.checkpoint.state import read_recipe, read_trainer_state
from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import Recipe

# Keys whose change would make the saved state meaningless: other weights, other training rows or data order
# (every data key decides which rows are trained on: the held-out split is cut out of the same documents), or
# predictors of another shape than the saved ones. `output_dir` is not one: a run folder moved or copied
# elsewhere resumes there (with a notice).
FIXED_KEYS = (
    "model.path", "model.dtype", "model.revision", "relufy", "peft", "data", "train.seed", "train.micro_batch_size",
    "train.grad_accum_steps", "predictor.enabled", "predictor.rank", "predictor.layer_ranks", "predictor.nonlinearity",
    "predictor.lookahead", "predictor.heads", "predictor.head_rank", "predictor.output_bias", "predictor.input",
)
# Keys fixed in one direction only: (key, old value) -> why the checkpoint cannot follow.
ONE_WAY = {
    ("train.freeze_model", True): "the run trained only the predictors, so the checkpoint holds no optimizer state "
                                  "for the model: export it and start a new run from the export to train the model",
}
# Changed keys that resume applies to restored state (optimizer hyper-parameters, the LR schedule), and how.
APPLIED_ON_RESUME = {
    "train.lr": "set on the restored optimizer and LR schedule",
    "train.weight_decay": "set on the restored optimizer",
    "train.adam_beta1": "set on the restored optimizer",
    "train.adam_beta2": "set on the restored optimizer",
    "train.max_steps": "the cosine LR schedule is re-stretched to the new length from the current step",
    "train.lr_warmup_steps": "the LR schedule is recomputed from the current step",
    "predictor.lr": "set on the restored predictor optimizer",
}


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
        if key == "output_dir":
            if Path(old[key]).resolve() != Path(new[key]).resolve():
                notices.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
            continue  # the same folder written relative and absolute, or a moved run folder
        change = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        if any(key == f or key.startswith(f + ".") for f in FIXED_KEYS):
            errors.append(change)
        elif (why := next((w for (k, v), w in ONE_WAY.items() if k == key and v == old.get(key)), None)):
            errors.append(f"{change}: {why}")
        else:
            notices.append(change)
    return errors, notices


@dataclass
class RecipeChange:
    """A resume's recipe changes, judged by the run's features before anything is loaded (each component's
    `on_resume`): a change a feature cannot follow is refused by name with the reason, the others say what they do
    from the resumed step on. `step`: the step the run continues from (0: a restart before the first checkpoint,
    where nothing has happened yet)."""

    saved: Recipe
    current: Recipe
    folder: Path  # the checkpoint (or, at a restart, the run folder)
    step: int
    changed: dict[str, tuple] = field(default_factory=dict)  # key -> (old, new), keys that are not fixed
    refused: list[str] = field(default_factory=list)
    how: dict[str, str] = field(default_factory=dict)  # key -> what its new value does
    also: list[str] = field(default_factory=list)  # what a change does beyond its own key (e.g. train.max_steps)

    def refuse(self, key: str, why: str) -> None:
        old, new = self.changed[key]
        self.refused.append(f"{key}: {old!r} -> {new!r}: {why}")

    def explain(self, key: str, how: str) -> None:
        self.how[key] = how

    def keep(self, key: str) -> str:
        """The way back to the saved value, as a command-line override (`keep KEY=VALUE`)."""
        old = self.changed[key][0]
        value = "null" if old is None else str(old).lower() if isinstance(old, bool) else old
        return f"keep {key}={value}"

    def keys(self, prefix: str) -> list[str]:
        """The changed keys of a section (`prefix` ends with a dot) or the one key `prefix`."""
        return [k for k in self.changed if k == prefix or k.startswith(prefix)]


def check_process_count(ckpt: Path, num_processes: int, sharded_optimizer: bool) -> None:
    """A sharded optimizer state (DeepSpeed ZeRO, FSDP2) can only be loaded by as many processes as saved it."""
    saved = read_trainer_state(ckpt)["num_processes"]
    if sharded_optimizer and saved != num_processes:
        raise SparsetuneError(
            f"cannot resume from {ckpt}: its optimizer state is sharded over {saved} processes and this run has "
            f"{num_processes}; relaunch with --num-processes {saved}")


def check_recipe(ckpt: Path, current: Recipe, report, judge: Callable[[RecipeChange], None] | None = None
                 ) -> list[str]:
    """Refuse changes the checkpoint cannot follow (one line naming the keys, old and new values and why); report
    the others with what resume does with them, from which step. `judge`: the run's features' verdicts on the
    changes (training/components: `judge_resume`). Returns the applied changes (for the run's recipe history).
    `ckpt`: a checkpoint folder, or a run folder whose recipe.yaml is the run's (a restart before the first
    checkpoint). Reads only recipe.yaml and the small JSON state files: nothing is loaded yet."""
    saved = read_recipe(ckpt)
    errors, notices = recipe_changes(saved, current)
    step = int(read_trainer_state(ckpt)["step"]) if (ckpt / "trainer_state.json").is_file() else 0
    old, new = _flatten(saved.model_dump(mode="json")), _flatten(current.model_dump(mode="json"))
    change = RecipeChange(saved, current, ckpt, step,
                          {c.split(":", 1)[0]: (old.get(c.split(":", 1)[0]), new.get(c.split(":", 1)[0]))
                           for c in notices if not c.startswith("output_dir:")})
    if judge is not None:
        judge(change)
    errors += change.refused
    if errors:
        raise SparsetuneError(
            f"cannot resume from {ckpt}: the recipe changed where the checkpoint cannot follow ({'; '.join(errors)}); "
            "restore these keys or start a new run in another output_dir"
        )
    for line in notices:
        key = line.split(":", 1)[0]
        if key == "output_dir":
            report(f"resume: the run folder moved ({line.split(': ', 1)[1]}); continuing in the new place")
            continue
        how = change.how.get(key) or APPLIED_ON_RESUME.get(key) or f"takes effect from step {step + 1}"
        report(f"resume: using the new value of {line} ({how})")
    for line in change.also:
        report(f"resume: {line}")
    return notices


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
