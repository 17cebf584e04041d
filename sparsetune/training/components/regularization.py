"""Sparsity regularization: a penalty on every MLP's activation (from the recorder's one capture per forward),
weighted by the coefficient schedule; and, at the final evaluation, the CETT-based effective sparsity beside the
exact zeros (from the same evaluation forwards: a token sample taken by the recorder)."""

from __future__ import annotations

from sparsetune.checkpoint.resume import RecipeChange
from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.cett import TokenSampler, cett_report
from sparsetune.sparsity.regularizers import get_regularizer
from sparsetune.sparsity.schedules import CoefficientSchedule
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.tracking.metrics import cett_metrics
from sparsetune.training.components.base import Component, EvalContext, EvalReport, LossTerm, Setup, StepContext


class SparsityRegularization(Component):
    name, order = "regularizer", 10
    step_metric_keys = ("reg_loss",)

    def __init__(self, recipe: Recipe):
        self.penalty = get_regularizer(recipe.regularizer.type)
        self.schedule = CoefficientSchedule(recipe.regularizer, recipe.train.max_steps)
        self.coef = self.schedule(0)
        self.recorder = None
        self.seed = recipe.train.seed
        self.final = False  # the next evaluation is the final one: measure CETT too
        self.sampler: TokenSampler | None = None

    @classmethod
    def build(cls, recipe: Recipe) -> SparsityRegularization:
        return cls(recipe)  # always: the coefficient is logged even for regularizer.type=none

    @classmethod
    def on_resume(cls, change: RecipeChange) -> None:
        """The schedule is a function of the step and train.max_steps (stages given by end_fraction move with it):
        the new recipe's from the resumed step on, with the coefficient it gives there."""
        keys = change.keys("regularizer.")
        if change.step == 0 or not (keys or "train.max_steps" in change.changed):
            return
        old, new = (CoefficientSchedule(r.regularizer, r.train.max_steps)(change.step)
                    for r in (change.saved, change.current))
        for key in keys:
            change.explain(key, f"the new schedule from step {change.step + 1} on: coefficient {new:g} there (was "
                           f"{old:g})")
        if not keys and new != old:
            change.also.append(f"regularizer: its stages given by end_fraction move with train.max_steps: coefficient "
                               f"{new:g} at step {change.step + 1} (was {old:g})")

    def after_surgery(self, setup: Setup) -> None:
        self.recorder = setup.recorder
        self.recorder.regularizer = self.penalty

    def begin_step(self, step: int, model_trains: bool) -> None:
        self.coef = self.schedule(step)
        self.recorder.reg_with_grad = self.coef > 0  # no graph for a term that is not added

    def loss_terms(self, ctx: StepContext) -> list[LossTerm]:
        reg = self.recorder.regularizer_loss()
        if reg is None:
            return []
        return [LossTerm("reg_loss", reg, self.coef * reg if self.coef > 0 else None)]

    def step_metrics(self) -> dict[str, float]:
        return {"reg_coef": self.coef}

    def finish_training(self, ctx: EvalContext) -> None:
        self.final = True

    def begin_eval(self) -> None:
        if self.final:
            self.sampler = TokenSampler(seed=self.seed)
            self.recorder.consumers.append(self.sampler)

    def end_eval(self, ctx: EvalContext) -> EvalReport:
        report = EvalReport(row={"reg_coef": self.schedule(ctx.step)})
        if self.sampler is not None:
            self.recorder.consumers.remove(self.sampler)
            cett = cett_report(self.sampler, sparse_mlps(ctx.model), reduce=ctx.reduce)
            self.sampler, self.final = None, False
            report.metrics.update(cett_metrics("eval", cett))
            report.result.update(cett)
        return report
