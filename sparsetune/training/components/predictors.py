"""Co-trained activation predictors: built on the SparseMLPs, fed by the recorder's capture (no extra forward),
optimized by their own AdamW, measured at every evaluation, checkpointed with the run."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from sparsetune.checkpoint.resume import RecipeChange
from sparsetune.checkpoint.state import load_torch_state
from sparsetune.console import notice
from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.dynamic import dynamic_eval, predicted_mask
from sparsetune.evaluation.sweep import predictor_sweep, sweep_table, write_sweep
from sparsetune.predictors.bank import PredictorBank, down_norm_reader, load_predictors
from sparsetune.predictors.calibration import calibrate_thresholds
from sparsetune.predictors.hooks import attach_head_hooks
from sparsetune.predictors.metrics import ConfusionCounts
from sparsetune.recipe.schema import Recipe
from sparsetune.surgery.sparse_mlp import patched_mlps, sparse_mlps
from sparsetune.surgery.structure import base_causal_lm
from sparsetune.tracking.metrics import predictor_metrics, predictor_tradeoff_fields
from sparsetune.training.components.base import Component, EvalContext, EvalReport, LossTerm, Setup, StepContext


def _mask_aware_from(r: Recipe) -> int | None:
    """The first step of the mask-aware phase (None: off)."""
    f = r.predictor.mask_aware_fraction
    return math.ceil(r.train.max_steps * (1 - f)) if f > 0 else None


def bank_for(model, recipe: Recipe) -> PredictorBank:
    """Predictors sized for the model; labels are exact zeros unless the activation has none (SiLU)."""
    cfg = base_causal_lm(model).config
    exact = sparse_mlps(model)[0].activation.exact_zeros
    return PredictorBank(recipe.predictor, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                         cfg.num_attention_heads, exact_zeros=exact)


class Predictors(Component):
    name, order = "predictors", 30
    has_state = True

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.bank: PredictorBank | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.accelerator = None
        self._train_counts = None
        self.pending_report: EvalReport | None = None
        # mask-aware phase: from this step on, the MLPs compute with the predicted masks (outside evaluations)
        self.mask_aware_from = _mask_aware_from(recipe)
        self._mask_patch: contextlib.ExitStack | None = None
        self._resume_mask_aware = False
        self._model = None

    @classmethod
    def build(cls, recipe: Recipe) -> Predictors | None:
        return cls(recipe) if recipe.predictor.enabled else None

    @classmethod
    def on_resume(cls, change: RecipeChange) -> None:
        """The mask-aware phase is the last predictor.mask_aware_fraction of train.max_steps: say where it starts
        now (it is on from that step to the end, so a later start turns it off until then)."""
        saved, now, step = change.saved, change.current, change.step
        if step == 0 or not now.predictor.enabled:
            return
        if "predictor.mask_aware_fraction" in change.changed or "train.max_steps" in change.changed:
            old, new = _mask_aware_from(saved), _mask_aware_from(now)
            if old == new:
                return
            where = f"from step {new + 1} on" if new is not None else "off"
            was = f"from step {old + 1}" if old is not None else "off"
            off = " (it is off until then)" if old is not None and new is not None and old <= step < new else ""
            line = f"the mask-aware forward is {where} (was {was}){off}"
            if "predictor.mask_aware_fraction" in change.changed:
                change.explain("predictor.mask_aware_fraction", line)
            else:
                change.also.append(f"predictor: {line}")

    def after_surgery(self, setup: Setup) -> None:
        r = self.recipe
        self.bank = bank_for(setup.model, r).to(setup.device)
        fraction = self.bank.neuron_param_fraction()
        if fraction > r.predictor.max_param_fraction:
            raise SparsetuneError(
                f"{ranks_key(r.predictor)} gives neuron predictors of {fraction:.1%} of the MLP "
                f"parameters, above predictor.max_param_fraction={r.predictor.max_param_fraction:g}; "
                "lower the ranks or raise the budget")
        setup.recorder.consumers.append(self.bank)
        self.bank.bind(setup.model)  # predictor.input=residual: taps on the model's residual stream
        self.bank.down_norms = down_norm_reader(sparse_mlps(setup.model))
        if r.predictor.heads:
            attach_head_hooks(setup.model, self.bank, setup.recorder)
        self.optimizer = torch.optim.AdamW(self.bank.parameters(), lr=r.predictor.lr, foreach=False)
        self.accelerator = setup.accelerator
        self._model = setup.model

    # ----------------------------------------------------------------- train
    def begin_step(self, step: int, model_trains: bool) -> None:
        if self.mask_aware_from is not None and step >= self.mask_aware_from and self._mask_patch is None:
            self._set_mask_aware(True)

    def _set_mask_aware(self, on: bool) -> None:
        """While on, every SparseMLP computes down(a * predicted mask); its sink still gets the true activation,
        so the predictors keep learning the true masks and the sparsity statistics stay those of the model."""
        if not on:
            if self._mask_patch is not None:
                self._mask_patch.close()
                self._mask_patch = None
            return
        choose = predicted_mask(self.bank)  # no gradient reaches the predictors through the mask

        def masked(mlp, x):
            return mlp.dense(x, mlp.sink, mask=choose)

        self._mask_patch = contextlib.ExitStack()
        self._mask_patch.enter_context(patched_mlps(self._model, override=masked))

    def begin_micro(self, index: int) -> None:
        self.bank.set_position(index)

    def loss_terms(self, ctx: StepContext) -> list[LossTerm]:
        loss = self.bank.pop_loss()  # its inputs are detached: it only reaches the predictors
        return [] if loss is None else [LossTerm("predictor_loss", loss, loss, model_loss=False)]

    def after_step(self, skipped: bool) -> None:
        """Average gradients across ranks (the bank is not wrapped in DDP), then one optimizer step; a step the
        trainer skipped as non-finite changes no predictor."""
        if not skipped:
            if self.accelerator.num_processes > 1:
                for p in self.bank.parameters():
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _summaries(self, reduce) -> dict:
        out = {}
        for name, counts in (("neurons", self.bank.counts), ("heads", self.bank.head_counts)):
            merged = counts.merge_counts() if counts is not None else None
            if merged is not None:
                out[name] = ConfusionCounts.summary(reduce(merged) if reduce else merged)
        return out

    def log_metrics(self, reduce) -> dict[str, float]:
        out = self._summaries(reduce)
        self.bank.reset_counts()
        return predictor_metrics("train", out, None)

    # ------------------------------------------------------------------ eval
    def begin_eval(self) -> None:
        """Evaluation counts go to fresh counters, and the bank records no loss (eval mode); evaluations measure
        the model itself, not the mask-aware forward."""
        self._resume_mask_aware = self._mask_patch is not None
        self._set_mask_aware(False)
        self._train_counts = (self.bank.counts, self.bank.head_counts)
        self.bank.reset_counts()
        self.bank.eval()

    def end_eval(self, ctx: EvalContext) -> EvalReport:
        pred = self._summaries(ctx.reduce)
        self.bank.counts, self.bank.head_counts = self._train_counts
        dyn = {}
        n = self.recipe.predictor.dynamic_eval_batches
        if n:
            dyn = dynamic_eval(ctx.model, self.bank, ctx.equal_count(ctx.held_out_batches(n)), ctx.device,
                               exact_zeros=self.bank.exact_zeros,
                               silu_active_fraction=self.recipe.predictor.silu_active_fraction, all_reduce=ctx.reduce)
        self.bank.train()
        report = EvalReport(metrics=predictor_metrics("eval", pred, dyn), row=predictor_tradeoff_fields(pred, dyn),
                            result={"predictor": pred, "dynamic": dyn})
        if self.pending_report is not None:  # the end-of-run sweep goes with the final evaluation
            report.result.update(self.pending_report.result)
            report.tables.update(self.pending_report.tables)
            report.images.update(self.pending_report.images)
            self.pending_report = None
        if self._resume_mask_aware:
            self._set_mask_aware(True)
        return report

    finish_order = 90  # calibrated after the thresholds conversion (50) and compensation (60): the model's final zeros

    def unfinished(self, folder: Path, step: int) -> str | None:
        cfg = self.recipe.predictor
        if cfg.target_mass_recall is None and cfg.target_recall is None:
            return None
        return "the predictors' per-layer threshold calibration (after the last step)"

    def finish_training(self, ctx: EvalContext) -> None:
        """The sweep curve (predictor.sweep_targets), then per-layer thresholds to predictor.target_recall /
        target_mass_recall, both on training micro-batches."""
        self._set_mask_aware(False)
        cfg = self.recipe.predictor
        if cfg.sweep_targets and cfg.dynamic_eval_batches:
            self._sweep(ctx)
        target = cfg.target_mass_recall if cfg.target_mass_recall is not None else cfg.target_recall
        if target is None:
            return
        kind = "mass_recall" if cfg.target_mass_recall is not None else "recall"
        batches = ctx.train_batches(cfg.calibration_batches)  # fewer when the data holds fewer
        thresholds = calibrate_thresholds(ctx.model, self.bank, batches, ctx.device, target, kind,
                                          seed=self.recipe.train.seed)
        probs = [1 / (1 + math.exp(-min(max(t, -50.0), 50.0))) for t in thresholds]
        notice(f"predictors: per-layer thresholds calibrated to {kind} {target:g} on {len(batches)} training "
               f"micro-batches (sigmoid {min(probs):.3g}..{max(probs):.3g})")

    def _sweep(self, ctx: EvalContext) -> None:
        cfg = self.recipe.predictor
        self.bank.eval()
        try:
            held = ctx.equal_count(ctx.held_out_batches(cfg.dynamic_eval_batches))
            sweep = predictor_sweep(ctx.model, self.bank, held,
                                    ctx.train_batches(cfg.calibration_batches), ctx.device, cfg.sweep_targets,
                                    all_reduce=ctx.reduce)
        finally:
            self.bank.train()
        self.pending_report = EvalReport(result={"sweep": sweep}, tables={"predictor_sweep": sweep_table(sweep)})
        if self.accelerator.is_main_process:
            folder = Path(self.recipe.output_dir)
            _, png = write_sweep(sweep, folder / "sweep", f"{folder.name}: predictors vs best possible")
            if png is not None:
                self.pending_report.images["predictor_sweep_plot"] = png
            notice(f"predictors: sweep of {len(sweep['neurons'])} targets written to {folder}/sweep.json")

    # ------------------------------------------------------------ checkpoint
    def save(self, folder: Path, last_eval: dict) -> None:
        self.bank.save(folder / "predictors", last_eval.get("predictor"))
        torch.save(self.optimizer.state_dict(), folder / "predictor_optimizer.pt")

    def load(self, folder: Path) -> None:
        saved = load_predictors(folder / "predictors")
        self.bank.load_state_dict(saved.state_dict())
        self.bank.layer_thresholds, self.bank.calibration = saved.layer_thresholds, saved.calibration
        self.optimizer.load_state_dict(load_torch_state(folder / "predictor_optimizer.pt"))
        for group in self.optimizer.param_groups:  # the recipe's predictor.lr, not the saved one (a resume change)
            group["lr"] = self.recipe.predictor.lr


def ranks_key(cfg) -> str:
    """The recipe key that sized the predictors, as the user wrote it."""
    if cfg.layer_ranks is not None:
        return f"predictor.layer_ranks={list(cfg.layer_ranks)}"
    return f"predictor.rank={cfg.rank}"
