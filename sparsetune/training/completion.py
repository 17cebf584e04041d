"""Whether a checkpoint holds a finished model: what its run does after the step it was saved at.

A run's last checkpoint is written after every component's `finish_training` (fixed thresholds fitted, compensation
fitted, predictors calibrated, the anneal at its end); any earlier checkpoint lacks some of that. Exporting or
evaluating one would give a model that is not what the run makes (an output_aware model without fixed thresholds
zeroes a quantile of each batch, so one sequence's logits move with its neighbours), so export and eval refuse it
by the names of what it lacks, with the command that finishes the run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import Recipe
from sparsetune.training.components import build_components
from sparsetune.training.phases import total_steps


def unfinished_parts(checkpoint: Path, recipe: Recipe, step: int) -> list[str]:
    """What `checkpoint` (at `step`, of `recipe`) lacks of the finished model, one phrase per component (empty:
    nothing)."""
    if step >= total_steps(recipe):
        return []
    return [why for c in build_components(recipe) if (why := c.unfinished(checkpoint, step)) is not None]


def refuse_unfinished_source(source: str | Path, action: str) -> None:
    """`refuse_unfinished` for a command's target when it is a run or a checkpoint, before anything is loaded."""
    from sparsetune.checkpoint.store import resolve_checkpoint
    from sparsetune.models.build import is_run_or_checkpoint

    if is_run_or_checkpoint(Path(source)):
        refuse_unfinished(resolve_checkpoint(Path(source)), action)


def refuse_unfinished(checkpoint: Path, action: str) -> None:
    """Raise the one-line refusal for `action` ("export", "eval") of a checkpoint that is not its run's finished
    model; nothing when it is."""
    from sparsetune.checkpoint.state import read_recipe, read_trainer_state

    recipe = read_recipe(checkpoint)
    step = int(read_trainer_state(checkpoint)["step"])
    missing = unfinished_parts(checkpoint, recipe, step)
    if not missing:
        return
    run = checkpoint.resolve().parent.parent  # RUN/checkpoints/step-N
    recipe_file = run / "recipe.yaml"
    finish = (f"sparsetune train {shlex.quote(str(recipe_file))} --resume" if recipe_file.is_file()
              else "the run's `sparsetune train ... --resume`")
    raise SparsetuneError(
        f"{checkpoint} is saved at step {step} of its run's {total_steps(recipe)} and lacks "
        f"{'; '.join(missing)}: it is not the model the run makes, so `sparsetune {action}` refuses it; finish the "
        f"run with `{finish}` and {action} its final checkpoint")
