"""A run's steps as phases, each run by an engine: train.max_steps model steps on the training engine, then the
predictor-only steps (`predictor.only_steps`) on the FrozenModel engine over it. A run with `train.freeze_model` is
one predictor-only phase from the start (its engine is FrozenModel already). Components learn the phase of a step
from the hook arguments (`begin_step(step, model_trains)`), never by re-deriving it from the recipe."""

from __future__ import annotations

from sparsetune.recipe.schema import Recipe
from sparsetune.training.engines import Engine, FrozenModel


def total_steps(recipe: Recipe) -> int:
    """The run's last step: the model's steps, then the predictor-only steps."""
    return recipe.train.max_steps + (recipe.predictor.only_steps if recipe.predictor.enabled else 0)


class Phases:
    def __init__(self, recipe: Recipe, engine: Engine):
        self.model_steps = recipe.train.max_steps
        self.total_steps = total_steps(recipe)
        only = self.total_steps - self.model_steps
        self.training = engine
        self.predictors_only = FrozenModel(engine.accelerator, recipe, placed_by=engine) if only else None

    def engine_at(self, step: int) -> Engine:
        """The engine that runs step `step` (0-based)."""
        if self.predictors_only is not None and step >= self.model_steps:
            return self.predictors_only
        return self.training

    def describe_end(self) -> str:
        """The step the run ends at and why, for the "already complete" notice."""
        end = f"train.max_steps={self.model_steps}"
        if self.total_steps > self.model_steps:
            end += f" + predictor.only_steps={self.total_steps - self.model_steps}"
        return end
