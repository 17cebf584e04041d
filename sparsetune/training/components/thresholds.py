"""Conversion to per-layer exact-zero thresholds during the run (recipe section `thresholds`).

At step round(thresholds.at_fraction * train.max_steps) the MLPs switch to a per-layer threshold rule on the gate
(FATReLU for ReLU-family runs: ProSparse's last step; CATS for top-k / SiLU runs: exact zeros without a sort), fitted
on the first training micro-batches (sparsity/thresholds.py). Training then goes on with it (a recovery phase), or,
at at_fraction 1.0, the conversion comes after the last step and before the final evaluation (training-free).
The held-out perplexity and sparsity just before and after are printed and logged; the fitted thresholds are
checkpointed with the run (so resume is exact on either side of the conversion) and carried by its exports.

At a resume, a change of a thresholds.* key takes effect while the conversion is still to come (and train.max_steps
moves it with at_fraction, announced); once converted, the thresholds are part of the model and a change is refused
by name. A conversion that would come before the annealing's end is refused too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparsetune.checkpoint.resume import RecipeChange
from sparsetune.console import notice
from sparsetune.evaluation.perplexity import evaluate
from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.recorder import ActivationRecorder
from sparsetune.sparsity.thresholds import CONVERSION_FILE, Conversion, fit_thresholds, read_conversion
from sparsetune.surgery.sparse_mlp import patched_mlps, sparse_mlps
from sparsetune.tracking.metrics import conversion_metrics
from sparsetune.training.components.annealing import resumed_segment
from sparsetune.training.components.base import Component, EvalContext, EvalReport, Setup


class ThresholdConversion(Component):
    name, order = "thresholds", 50
    has_state = True

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.kind = recipe.thresholds.form_for(recipe.relufy.activation)
        self.at_step = round(recipe.thresholds.at_fraction * recipe.train.max_steps)
        self.conversion: Conversion | None = None
        self.pending_log = False  # converted, and the figures not yet in metrics.jsonl
        self.model = self.accelerator = self.engine = None
        self.eval_context = None

    @classmethod
    def build(cls, recipe: Recipe) -> ThresholdConversion | None:
        return cls(recipe) if recipe.thresholds.enabled else None

    def after_prepare(self, setup: Setup) -> None:
        self.model, self.accelerator, self.engine = setup.model, setup.accelerator, setup.engine
        self.eval_context = setup.eval_context

    # ------------------------------------------------------------ conversion
    def begin_step(self, step: int, model_trains: bool) -> None:
        # at_fraction 1.0: step max_steps begins only when predictor-only steps follow the model's (they then train on
        # the converted model); otherwise finish_training converts
        if self.conversion is None and step >= self.at_step:
            self._convert(self.eval_context())

    def unfinished(self, folder: Path, step: int) -> str | None:
        if step > self.at_step and self.at_step < self.recipe.train.max_steps:
            return None  # converted at the start of step at_step
        return (f"the `thresholds` conversion to fixed per-layer `{self.kind}` thresholds"
                + (" (fitted after the last step)" if self.at_step >= self.recipe.train.max_steps
                   else f" (at step {self.at_step})"))

    def finish_training(self, ctx: EvalContext) -> None:
        if self.conversion is None:
            self._convert(ctx)

    def _convert(self, ctx: EvalContext) -> None:
        cfg, r = self.recipe.thresholds, self.recipe
        held = self._held_out(ctx, r.train.eval_batches)
        before = self._measure(ctx, held)
        batches = ctx.train_batches(cfg.calibration_batches)  # fewer when the data holds fewer
        fits = fit_thresholds(ctx.model, batches, ctx.device, self.kind, cfg.target_sparsity, cfg.cett,
                              cfg.tokens_per_layer, len(batches), seed=r.train.seed)
        criterion = {"target_sparsity": cfg.target_sparsity} if cfg.cett is None else {"cett": cfg.cett}
        cetts = [f.cett for f in fits]
        conversion = Conversion(
            step=ctx.step, kind=self.kind, from_activation=r.relufy.activation, criterion=criterion,
            calibration_batches=len(batches), tokens_per_layer=cfg.tokens_per_layer,
            thresholds=[f.threshold for f in fits], fit_sparsity_per_layer=[f.sparsity for f in fits],
            fit_cett_per_layer=None if any(c is None for c in cetts) else cetts, before=before, after={})
        conversion.apply(ctx.model)
        conversion.after = self._measure(ctx, held)
        self.conversion, self.pending_log = conversion, True
        notice(conversion.describe(), main=self.accelerator.is_main_process)

    def _held_out(self, ctx: EvalContext, n: int) -> list[dict]:
        """This rank's first n held-out micro-batches; under sharded weights (every forward collective) padded with
        label-less batches to the longest rank's count, as the trainer's evaluation does."""
        batches = ctx.held_out_batches(n)
        if self.engine.shards_parameters and self.accelerator.num_processes > 1:
            count = torch.tensor(len(batches), device=ctx.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            ids = ctx.train_batches(1)[0]["input_ids"][:1]
            batches += [{"input_ids": ids, "labels": torch.full_like(ids, -100)}] * (int(count) - len(batches))
        return batches

    @staticmethod
    def _measure(ctx: EvalContext, batches: list[dict]) -> dict:
        """Held-out perplexity and exact-zero sparsity of the model as it computes now (its own recorder: the run's
        statistics and predictors see nothing of it)."""
        recorder = ActivationRecorder(len(sparse_mlps(ctx.model)), None, None)
        with patched_mlps(ctx.model, sink=recorder, override=None):
            result = evaluate(ctx.model, batches, recorder, ctx.device, all_reduce=ctx.reduce)
        return {"perplexity": result["perplexity"], "loss": result["loss"], "tokens": result["tokens"],
                "sparsity": result.get("sparsity", 0.0), "per_layer": result.get("per_layer", [])}

    # --------------------------------------------------------------- logging
    def _pending_metrics(self) -> dict[str, float]:
        if not self.pending_log:
            return {}
        self.pending_log = False
        return conversion_metrics(self.conversion.to_json())

    def log_metrics(self, reduce) -> dict[str, float]:
        return self._pending_metrics()

    def end_eval(self, ctx: EvalContext) -> EvalReport:
        if self.conversion is None:
            return EvalReport()
        return EvalReport(metrics=self._pending_metrics(), result={"thresholds": self.conversion.to_json()})

    # ------------------------------------------------------------ checkpoint
    def save(self, folder: Path, last_eval: dict) -> None:
        state = {"conversion": self.conversion.to_json() if self.conversion else None,
                 "pending_log": self.pending_log, "at_step": self.at_step}
        (folder / CONVERSION_FILE).write_text(json.dumps(state, indent=1))

    def load(self, folder: Path) -> None:
        """The conversion's record. The fitted thresholds themselves are already on the model: they are its
        activation state, put back when the model was built (a resume that changes thresholds.* after the conversion
        is refused in on_resume). A checkpoint from before the conversion, or of a run that enables `thresholds` only
        on this resume (it holds no thresholds.json), leaves the conversion to its step."""
        conversion, state = read_conversion(folder)
        self.conversion, self.pending_log = conversion, bool(state.get("pending_log", False))

    @classmethod
    def on_resume(cls, change: RecipeChange) -> None:
        saved, now, step = change.saved, change.current, change.step
        keys = change.keys("thresholds.")
        if step == 0 or not (saved.thresholds.enabled or now.thresholds.enabled):
            return
        conversion = read_conversion(change.folder)[0] if saved.thresholds.enabled else None
        if conversion is not None:
            for key in keys:
                change.refuse(key, f"the run converted to {conversion.kind} thresholds fitted to "
                              f"{conversion.criterion} at step {conversion.step}; they are part of the model now: "
                              f"{change.keep(key)}")
            if "train.max_steps" in change.changed and not keys:
                change.also.append(f"thresholds: converted at step {conversion.step}; the fitted thresholds stay")
            return
        cfg = now.thresholds
        at = round(cfg.at_fraction * now.train.max_steps) if cfg.at_fraction < 1.0 else None
        when = f"at step {max(at, step)}" if at is not None else f"after the last step ({now.train.max_steps})"
        if cfg.enabled and at is not None:
            end = resumed_segment(change.folder, saved, now, step).end_step
            if max(at, step) < end:
                for key in keys + change.keys("train.max_steps") + change.keys("anneal.fraction"):
                    change.refuse(key, f"the conversion would come at step {max(at, step)}, before the annealing "
                                  f"ends at step {end}: choose thresholds.at_fraction >= "
                                  f"{end / now.train.max_steps:.3g}")
                return
        for key in keys:
            change.explain(key, f"the conversion {when} uses it" if cfg.enabled else "no conversion will be made")
        if "train.max_steps" in change.changed and cfg.enabled and saved.thresholds.enabled:
            old = saved.thresholds
            before = (f"step {round(old.at_fraction * saved.train.max_steps)}" if old.at_fraction < 1.0
                      else f"after the last step ({saved.train.max_steps})")
            change.also.append(f"thresholds: the conversion moves from {before} to {when}")
