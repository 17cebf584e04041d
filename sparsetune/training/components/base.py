"""The protocol every feature of a training run implements.

The trainer owns the model, the data, the engine and the activation recorder; a component adds to the loss, reacts
to optimizer steps, contributes evaluation figures, and has state that checkpoints carry. Every hook has a no-op
default, so a component implements only what it uses. Call order in a run:

  build(recipe)                      -> the component, or None when the recipe leaves it off
  before_surgery(setup)              the dense model, before relufy (e.g. distillation copies its teacher)
  after_surgery(setup)               SparseMLPs in place, recorder attached, before LoRA / engine wrapping
  after_prepare(setup)               the engine has wrapped the model
  per optimizer step:  begin_step(step, model_trains); per micro-batch: begin_micro(index), loss_terms(ctx);
                       after_step(skipped)
  per log window:      log_metrics(reduce)
  per evaluation:      begin_eval(), end_eval(ctx) -> EvalReport
  after the last step: finish_training(ctx), before the final evaluation (e.g. calibrating thresholds)
  per checkpoint:      save(folder) on the main process; load(folder) on every rank at resume
  at a resume, before anything is loaded: on_resume(change), a classmethod judging the recipe's changes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsetune.checkpoint.resume import RecipeChange
from sparsetune.recipe.schema import Recipe


@dataclass
class Setup:
    """What the trainer hands its components while it builds the run."""

    recipe: Recipe
    model: Any  # the model at this stage (dense, surgery'd, or wrapped by the engine)
    recorder: Any = None  # sparsetune.sparsity.recorder.ActivationRecorder
    engine: Any = None  # sparsetune.training.engines.Engine
    device: torch.device | None = None
    accelerator: Any = None
    load_model: Callable[[], Any] | None = None  # a fresh copy of the dense model from model.path
    eval_context: Callable[[], EvalContext] | None = None  # data access mid-run (the current step, its batches)


@dataclass
class StepContext:
    """One micro-batch's forward: the (wrapped) model, its outputs and the batch."""

    model: Any
    outputs: Any
    batch: dict[str, torch.Tensor]


@dataclass
class LossTerm:
    """`value` is logged as `train/<name>`; `added` (if not None) is added to the loss. Terms with
    `model_loss=False` (the predictors' own loss) train only the component and are left out of `train/loss`."""

    name: str
    value: torch.Tensor
    added: torch.Tensor | None
    model_loss: bool = True


@dataclass
class EvalContext:
    model: Any
    device: torch.device
    reduce: Callable[[torch.Tensor], torch.Tensor] | None  # sum over ranks, None with one process
    held_out_batches: Callable[[int], list[dict]]  # the first n held-out micro-batches of this rank
    step: int
    train_batches: Callable[[int], list[dict]] | None = None  # the first n training micro-batches (same on all ranks)
    sharded: bool = False  # parameters are sharded: every forward is collective, each rank runs as many

    def equal_count(self, batches: list[dict]) -> list[dict]:
        """This rank's batches cut to the fewest any rank has, so every rank runs the same number of forwards
        when they are collective (sharded parameters); unchanged otherwise."""
        if not self.sharded or self.reduce is None:
            return batches
        count = torch.tensor(len(batches), device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        return batches[:int(count)]


@dataclass
class EvalReport:
    """metrics: flat keys for metrics.jsonl / W&B; row: tradeoff.csv fields; result: kept in the run's last
    evaluation (checkpoints, export report); tables and images: logged to W&B."""

    metrics: dict = field(default_factory=dict)
    row: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    tables: dict[str, tuple[list, list]] = field(default_factory=dict)  # W&B tables: name -> (columns, rows)
    images: dict[str, Path] = field(default_factory=dict)  # W&B images: name -> PNG file


class Component:
    name: str = ""
    order: int = 100  # loss terms are added in this order (it fixes the float summation order)
    step_metric_keys: tuple[str, ...] = ()  # names of loss terms always logged (0.0 when absent at a step)
    teacher = None  # a second model the component runs forward only (its per-rank share is reported)

    @classmethod
    def build(cls, recipe: Recipe) -> Component | None:
        return None

    @classmethod
    def on_resume(cls, change: RecipeChange) -> None:
        """At a resume with a changed recipe, before anything is loaded (main process): `change.refuse(key, why)`
        each change this feature cannot follow from `change.step` on, `change.explain(key, how)` what the others do,
        `change.also` what a change of another key (train.max_steps) does to this feature. Only JSON state of the
        checkpoint (`change.folder`) may be read here."""

    # ----------------------------------------------------------------- setup
    def before_surgery(self, setup: Setup) -> None:
        pass

    def after_surgery(self, setup: Setup) -> None:
        pass

    def after_prepare(self, setup: Setup) -> None:
        pass

    # ----------------------------------------------------------------- steps
    def begin_step(self, step: int, model_trains: bool) -> None:
        """`model_trains`: False in the predictor-only phase (the model runs without a graph, nothing of it is
        optimized; see training/phases.py)."""

    def begin_micro(self, index: int) -> None:
        pass

    def loss_terms(self, ctx: StepContext) -> list[LossTerm]:
        return []

    def after_step(self, skipped: bool) -> None:
        pass

    def step_metrics(self) -> dict[str, float]:
        """Figures of this optimizer step, averaged over the log window (e.g. a coefficient)."""
        return {}

    def log_metrics(self, reduce) -> dict[str, float]:
        """Figures accumulated since the last log (e.g. confusion counts), reduced over ranks."""
        return {}

    # ------------------------------------------------------------------ eval
    def begin_eval(self) -> None:
        pass

    def end_eval(self, ctx: EvalContext) -> EvalReport:
        return EvalReport()

    def finish_training(self, ctx: EvalContext) -> None:
        pass

    finish_order: int | None = None  # finish_training runs in this order (default: `order`)

    def unfinished(self, folder: Path, step: int) -> str | None:
        """What the checkpoint `folder`, saved after `step` optimizer steps before the run's end, lacks of what this
        component does to the model later (a fit after the last step, the rest of a ramp), or None: export and eval
        refuse such a checkpoint by these names (training/completion.py)."""
        return None

    # ------------------------------------------------------------ checkpoint
    has_state: bool = False

    def save(self, folder: Path, last_eval: dict) -> None:
        """Write this component's state into the checkpoint folder (main process)."""

    def load(self, folder: Path) -> None:
        """Restore what save() wrote (every rank)."""
