"""Annealed surgery (recipe section `anneal`): the MLPs move from the model's SiLU to relufy's activation over the
first round(anneal.fraction * train.max_steps) steps, so the run never sees the swap's shock.

The progress p = step / annealing steps is set on every SparseMLP before each step (its forward then computes the
activation's `annealed(gate, up, p)`: an interpolation by default, a rising share for top-k and output_aware). It is
a function of the step alone, so a resume sets it from the checkpoint's step and stays bitwise; checkpoints and
exports carry the target activation, which is what the model computes from the annealing's end on.
"""

from __future__ import annotations

from pathlib import Path

from sparsetune.checkpoint.state import read_trainer_state
from sparsetune.recipe.schema import Recipe
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.training.components.base import Component, EvalContext, Setup


class Annealing(Component):
    name, order = "anneal", 5

    def __init__(self, recipe: Recipe):
        self.steps = recipe.anneal.steps(recipe.train.max_steps)
        self.mlps: list = []
        self.progress = 0.0

    @classmethod
    def build(cls, recipe: Recipe) -> Annealing | None:
        return cls(recipe) if recipe.anneal.steps(recipe.train.max_steps) > 0 else None

    def _set(self, progress: float) -> None:
        self.progress = min(1.0, max(0.0, progress))
        for m in self.mlps:
            m.anneal = self.progress

    def after_surgery(self, setup: Setup) -> None:
        self.mlps = sparse_mlps(setup.model)
        self._set(0.0)  # the evaluation before training sees the dense model

    def begin_step(self, step: int, model_trains: bool) -> None:
        self._set(step / self.steps)

    def step_metrics(self) -> dict[str, float]:
        return {"anneal_progress": self.progress}

    def unfinished(self, step: int) -> str | None:
        if step >= self.steps:
            return None
        return (f"the rest of the anneal (it ends at step {self.steps}; at step {step} the MLPs compute "
                f"{step / self.steps:.0%} of the way from SiLU to the target, which no export can express)")

    def finish_training(self, ctx: EvalContext) -> None:
        self._set(1.0)  # the final evaluation, conversions and exports see the target activation

    def load(self, folder: Path) -> None:
        self._set(int(read_trainer_state(folder).get("step", 0)) / self.steps)
