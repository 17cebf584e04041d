"""Dropped-activation compensation during the run (recipe section `compensation`).

The bias (sparsity/compensation.py) is fitted once the model's zero rule is final: after the last step, before the
final evaluation (and after a `thresholds` conversion at that point), or, with compensation.train, before the step
where the rule becomes final (the conversion step, or the annealing's end), and then trained with the model. The
fitted biases are part of the model's activation state (every checkpoint carries them; resume, eval and export put
them back); this component's own part records when they were fitted.

At a resume, compensation.enabled / compensation.calibration_batches take effect while the biases are not fitted
yet; once fitted (they are part of the model) a change is refused by name, and so is any change of whether the bias
trains (compensation.train, or enabled with train on): the trained bias is a parameter of the model and of its
optimizer state. A bias fitted at the annealing's end keeps that step when train.max_steps grows (the annealing
keeps its end: annealing.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsetune.checkpoint.resume import RecipeChange
from sparsetune.checkpoint.state import read_recipe, read_trainer_state
from sparsetune.console import notice
from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.compensation import apply_compensation, fit_compensation
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.training.components.annealing import resumed_segment
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

    def unfinished(self, folder: Path, step: int) -> str | None:
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
            notice(f"compensation: step {ctx.step}: fitted {len(fit.biases)} layer biases on {fit.tokens} calibration "
                   f"tokens; they remove {mean:.1%} of the dropped activations' squared MLP-output error (per layer "
                   f"{min(fit.removed):.1%}..{max(fit.removed):.1%})")

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
        self.fit_step = _fit_step(self.recipe, folder, read_recipe(folder), int(read_trainer_state(folder)["step"]))

    @classmethod
    def on_resume(cls, change: RecipeChange) -> None:
        saved, now, step = change.saved, change.current, change.step
        keys = change.keys("compensation.")
        if step == 0 or not (saved.compensation.enabled or now.compensation.enabled):
            return
        trains = [r.compensation.enabled and r.compensation.train for r in (saved, now)]
        if trains[0] != trains[1]:
            held = "holds" if trains[0] else "does not hold"
            for key in keys:
                if key in ("compensation.train", "compensation.enabled"):
                    change.refuse(key, "the trained bias (compensation.train) is a parameter of the model and of its "
                                  f"optimizer, which the checkpoint {held}: {change.keep(key)}")
            return
        path = change.folder / STATE_FILE
        fitted = json.loads(path.read_text())["fitted"] if saved.compensation.enabled and path.is_file() else None
        if fitted is not None:
            for key in keys:
                change.refuse(key, f"the biases were fitted at step {fitted['step']} and are part of the model now: "
                              + change.keep(key))
            if "train.max_steps" in change.changed and not keys:
                change.also.append(f"compensation: the biases fitted at step {fitted['step']} stay"
                                   + (" and go on training" if trains[1] else " (they are not fitted again)"))
            return
        when = _fit_step(now, change.folder, saved, step)
        at = f"at step {max(when, step)}" if when is not None else f"after the last step ({now.train.max_steps})"
        for key in keys:
            change.explain(key, "no biases will be fitted" if not now.compensation.enabled else
                           f"the biases are fitted {at}" if key == "compensation.enabled" else f"the fit {at} uses it")
        if "train.max_steps" in change.changed and now.compensation.enabled:
            change.also.append(f"compensation: the biases are fitted {at}")


def _fit_step(recipe: Recipe, folder: Path, saved: Recipe, step: int) -> int | None:
    """The step the bias is fitted before in a run resumed from `folder` at `step`: where it fits at the annealing's
    end, the end the annealing keeps (not a re-stretched one)."""
    fit = recipe.compensation.fit_step(recipe)
    if fit is None or recipe.thresholds.enabled:
        return fit
    return resumed_segment(folder, saved, recipe, step).end_step
