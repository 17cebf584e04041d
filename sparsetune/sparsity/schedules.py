"""Regularizer coefficient schedules: a pure function of the optimizer step.

Being stateless in the step, a schedule resumes exactly from the step number alone.
"""

from __future__ import annotations

import math

from sparsetune.recipe.schema import RegularizerSection


class CoefficientSchedule:
    """lambda(step) for constant, linear warmup, and ProSparse progressive sine stages."""

    def __init__(self, cfg: RegularizerSection, max_steps: int):
        self.kind = cfg.schedule
        self.coef = cfg.coef
        self.warmup_steps = cfg.warmup_steps
        # ProSparse stages as (end step, coef). Stage 0 holds its coef from step 0; stage i rises
        # from coef_{i-1} to coef_i along half a sine between end_{i-1} and end_i.
        self.stages = [
            (float(s.end_step) if s.end_step is not None else s.end_fraction * max_steps, s.coef)
            for s in cfg.stages
        ]

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.coef
        if self.kind == "warmup":
            return self.coef * min(1.0, step / self.warmup_steps)
        return self._prosparse(step)

    def _prosparse(self, step: int) -> float:
        first_end, first_coef = self.stages[0]
        if step <= first_end:
            return first_coef
        prev_end, prev_coef = first_end, first_coef
        for end, coef in self.stages[1:]:
            if step <= end:
                eta = (math.sin(-math.pi / 2 + math.pi * (step - prev_end) / (end - prev_end)) + 1) / 2
                return prev_coef + eta * (coef - prev_coef)
            prev_end, prev_coef = end, coef
        return prev_coef
