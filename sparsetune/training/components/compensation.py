"""Dropped-activation compensation during the run (recipe section `compensation`).

The bias (sparsity/compensation.py) is fitted once the model's zero rule is final: after the last step, before the
final evaluation (and after a `thresholds` conversion at that point), or, with compensation.train, before the step
where the rule becomes final (the conversion step, or the annealing's end), and then trained with the model. The
fitted biases are part of the model's activation state (every checkpoint carries them; resume, eval and export put
them back); this component's own part records when they were fitted.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.compensation import apply_compensation, fit_compensation
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.training.components.base import Component, EvalContext, EvalReport, Setup

STATE_FILE = "compensation.json"


class Compensation(Component):
    name, order = "compensation", 60  # after the thresholds conversion (50): it compensates the converted rule
    has_state = True

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cfg = recipe.compensation
        self.fit_step = self.cfg.fit_step(recipe)
        self.fitted: dict | None = None  # {"step", "removed_per_layer", "tokens"} once fitted
        self.eval_context = self.accelerator = None

    @classmethod
    def build(cls, recipe: Recipe) -> Compensation | None:
        return cls(recipe) if recipe.compensation.enabled else None

    def after_surgery(self, setup: Setup) -> None:
        if self.cfg.train:  # a parameter from the start, so the optimizer holds it (zero until fitted)
            mlps = sparse_mlps(setup.model)
            width = mlps[0].projections()[2].out_features
            apply_compensation(setup.model, [m.compensation if m.compensation is not None else [0.0] * width
                                             for m in mlps], trainable=True)

    def after_prepare(self, setup: Setup) -> None:
        self.eval_context, self.accelerator = setup.eval_context, setup.accelerator

    def begin_step(self, step: int, model_trains: bool) -> None:
        if self.fitted is None and self.fit_step is not None and step >= self.fit_step:
            self._fit(self.eval_context())

    def unfinished(self, step: int) -> str | None:
        if self.fit_step is not None and step > self.fit_step:
            return None
        return "the compensation biases' fit" + (" (after the last step)" if self.fit_step is None
                                                  else f" (at step {self.fit_step})")

    def finish_training(self, ctx: EvalContext) -> None:
        if self.fitted is None:
            self._fit(ctx)

    def _fit(self, ctx: EvalContext) -> None:
        fit = fit_compensation(ctx.model, ctx.train_batches(self.cfg.calibration_batches), ctx.device)
        apply_compensation(ctx.model, fit.biases, trainable=self.cfg.train)
        self.fitted = {"step": ctx.step, "tokens": fit.tokens, "removed_per_layer": fit.removed}
        if self.accelerator.is_main_process:
            mean = sum(fit.removed) / len(fit.removed)
            print(f"sparsetune: compensation: step {ctx.step}: fitted {len(fit.biases)} layer biases on {fit.tokens} "
                  f"calibration tokens; they remove {mean:.1%} of the dropped activations' squared MLP-output error "
                  f"(per layer {min(fit.removed):.1%}..{max(fit.removed):.1%})", flush=True)

    def end_eval(self, ctx: EvalContext) -> EvalReport:
        if self.fitted is None:
            return EvalReport()
        removed = self.fitted["removed_per_layer"]
        return EvalReport(metrics={"compensation/removed_error": sum(removed) / len(removed),
                                   "compensation/fitted_at_step": self.fitted["step"]},
                          result={"compensation": self.fitted})

    def save(self, folder: Path, last_eval: dict) -> None:
        (folder / STATE_FILE).write_text(json.dumps({"fitted": self.fitted}, indent=1))

    def load(self, folder: Path) -> None:
        """When it was fitted; the biases themselves came back with the model's activation state."""
        path = folder / STATE_FILE
        self.fitted = json.loads(path.read_text())["fitted"] if path.is_file() else None
