"""Sparsity regularization: a penalty on every MLP's activation (from the recorder's one capture per forward),
weighted by the coefficient schedule."""

from __future__ import annotations

from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.regularizers import get_regularizer
from sparsetune.sparsity.schedules import CoefficientSchedule
from sparsetune.training.components.base import Component, EvalContext, EvalReport, LossTerm, Setup, StepContext


class SparsityRegularization(Component):
    name, order = "regularizer", 10
    step_metric_keys = ("reg_loss",)

    def __init__(self, recipe: Recipe):
        self.penalty = get_regularizer(recipe.regularizer.type)
        self.schedule = CoefficientSchedule(recipe.regularizer, recipe.train.max_steps)
        self.coef = self.schedule(0)
        self.recorder = None

    @classmethod
    def build(cls, recipe: Recipe) -> SparsityRegularization:
        return cls(recipe)  # always: the coefficient is logged even for regularizer.type=none

    def after_surgery(self, setup: Setup) -> None:
        self.recorder = setup.recorder
        self.recorder.regularizer = self.penalty

    def begin_step(self, step: int) -> None:
        self.coef = self.schedule(step)
        self.recorder.reg_with_grad = self.coef > 0  # no graph for a term that is not added

    def loss_terms(self, ctx: StepContext) -> list[LossTerm]:
        reg = self.recorder.regularizer_loss()
        if reg is None:
            return []
        return [LossTerm("reg_loss", reg, self.coef * reg if self.coef > 0 else None)]

    def step_metrics(self) -> dict[str, float]:
        return {"reg_coef": self.coef}

    def end_eval(self, ctx: EvalContext) -> EvalReport:
        return EvalReport(row={"reg_coef": self.schedule(ctx.step)})
