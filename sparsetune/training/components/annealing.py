"""Annealed surgery (recipe section `anneal`): the MLPs move from the model's SiLU to relufy's activation over the
first round(anneal.fraction * train.max_steps) steps, so the run never sees the swap's shock.

The progress p = step / annealing steps is set on every SparseMLP before each step (its forward then computes the
activation's `annealed(gate, up, p)`: an interpolation by default, a rising share for top-k and output_aware). It is
a function of the step and of the annealing's end, which the checkpoint records (`anneal.json`), so a resume sets it
from the checkpoint's step and stays bitwise; checkpoints and exports carry the target activation, which is what the
model computes from the annealing's end on.

Resume keeps the progress monotone: a longer `train.max_steps` keeps the recorded end (anneal.fraction is a share
of the run as it was started; re-stretching it would move the progress backwards), a finished annealing stays
finished, and a new `anneal.fraction` continues linearly from the progress reached to 1 at its new end
(round(fraction * max_steps)); an end not after the resumed step, or a new fraction once the annealing has ended
(or never ran), is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sparsetune.checkpoint.resume import RecipeChange
from sparsetune.checkpoint.state import read_recipe, read_trainer_state
from sparsetune.recipe.schema import Recipe
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.training.components.base import Component, EvalContext, Setup

STATE_FILE = "anneal.json"


@dataclass
class AnnealSegment:
    """The progress rises linearly from `start_progress` at `start_step` to 1 at `end_step`, and stays 1 after."""

    start_step: int = 0
    start_progress: float = 0.0
    end_step: int = 0

    def progress(self, step: int) -> float:
        if step >= self.end_step:
            return 1.0
        if self.start_step == 0 and self.start_progress == 0.0:
            return step / self.end_step  # the form a run that never changed its annealing computes (bitwise)
        done = (step - self.start_step) / (self.end_step - self.start_step)
        return min(1.0, max(0.0, self.start_progress + (1.0 - self.start_progress) * done))


def saved_segment(folder: Path, saved: Recipe) -> AnnealSegment:
    """The annealing a checkpoint was written under: its anneal.json, or (a run without annealing, which writes
    none) the one its recipe started with."""
    path = folder / STATE_FILE
    if path.is_file():
        return AnnealSegment(**json.loads(path.read_text()))
    return AnnealSegment(end_step=saved.anneal.steps(saved.train.max_steps))


def resumed_segment(folder: Path, saved: Recipe, current: Recipe, step: int) -> AnnealSegment:
    """The annealing a run resumed at `step` under `current` follows: the checkpoint's, or, when anneal.fraction
    changed, one from the progress reached to 1 at the new end (on_resume refuses the ends that cannot be)."""
    segment = saved_segment(folder, saved)
    if current.anneal.fraction != saved.anneal.fraction:
        return AnnealSegment(step, segment.progress(step), current.anneal.steps(current.train.max_steps))
    return segment


class Annealing(Component):
    name, order = "anneal", 5
    has_state = True

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.segment = AnnealSegment(end_step=recipe.anneal.steps(recipe.train.max_steps))
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
        self._set(self.segment.progress(step))

    def step_metrics(self) -> dict[str, float]:
        return {"anneal_progress": self.progress}

    def unfinished(self, folder: Path, step: int) -> str | None:
        segment = saved_segment(folder, self.recipe)
        if step >= segment.end_step:
            return None
        return (f"the rest of the anneal (it ends at step {segment.end_step}; at step {step} the MLPs compute "
                f"{segment.progress(step):.0%} of the way from SiLU to the target, which no export can express)")

    def finish_training(self, ctx: EvalContext) -> None:
        self._set(1.0)  # the final evaluation, conversions and exports see the target activation

    def save(self, folder: Path, last_eval: dict) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self.segment), indent=1))

    def load(self, folder: Path) -> None:
        step = int(read_trainer_state(folder)["step"])
        self.segment = resumed_segment(folder, read_recipe(folder), self.recipe, step)
        self._set(self.segment.progress(step))

    @classmethod
    def on_resume(cls, change: RecipeChange) -> None:
        saved, now, step = change.saved, change.current, change.step
        fraction_changed = "anneal.fraction" in change.changed
        if step == 0 or (saved.anneal.steps(saved.train.max_steps) == 0 and not fraction_changed):
            return  # a restart (nothing ran yet), or a run that never annealed
        segment = saved_segment(change.folder, saved)
        progress = segment.progress(step)
        if fraction_changed:
            end = now.anneal.steps(now.train.max_steps)
            old = change.changed["anneal.fraction"][0]
            if segment.end_step == 0:
                change.refuse("anneal.fraction", f"the run did not anneal (its MLPs compute "
                              f"{saved.relufy.activation} since step 0) and an annealing cannot start mid-run: "
                              f"{change.keep('anneal.fraction')}")
            elif progress >= 1.0:
                change.refuse("anneal.fraction", f"the annealing ended at step {segment.end_step} (the MLPs "
                              f"compute {saved.relufy.activation} since) and cannot start again: "
                              f"{change.keep('anneal.fraction')}")
            elif end <= step:
                change.refuse("anneal.fraction", f"the annealing would end at step {end}, not after the resumed step "
                              f"{step}, so its progress would jump from {progress:.3g} to 1 at once: choose "
                              f"anneal.fraction >= {(step + 1) / now.train.max_steps:.3g} or keep {old}")
            else:
                change.explain("anneal.fraction", f"the annealing goes on from progress {progress:.3g} at step "
                               f"{step} to 1 at step {end}, linearly")
            return
        if "train.max_steps" not in change.changed:
            return
        if progress < 1.0 and segment.end_step > now.train.max_steps:
            change.refuse("train.max_steps", f"the run would end before the annealing's end at step "
                          f"{segment.end_step} (progress {progress:.3g} now): keep train.max_steps >= "
                          f"{segment.end_step}")
            return
        state = "" if progress < 1.0 else ": it stays finished"
        change.also.append(f"anneal: keeps its end at step {segment.end_step} (progress {progress:.3g} now{state})")
