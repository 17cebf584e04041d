import math

import pytest

from sparsetune.recipe.schema import RegularizerSection
from sparsetune.sparsity.schedules import CoefficientSchedule


def test_constant_and_warmup():
    assert CoefficientSchedule(RegularizerSection(coef=0.3), 100)(57) == 0.3
    warm = CoefficientSchedule(RegularizerSection(coef=0.4, schedule="warmup", warmup_steps=10), 100)
    assert [warm(s) for s in (0, 5, 10, 50)] == [0.0, pytest.approx(0.2), 0.4, 0.4]


def test_prosparse_sine_stages_at_known_steps():
    cfg = RegularizerSection(schedule="prosparse", stages=[
        {"end_step": 10, "coef": 0.01}, {"end_step": 30, "coef": 0.05}, {"end_fraction": 0.5, "coef": 0.1}])
    sched = CoefficientSchedule(cfg, max_steps=100)
    # stage 1: constant (ProSparse's warmup stage)
    assert sched(0) == sched(10) == 0.01
    # stage 2 (10 -> 30): eta = (sin(-pi/2 + pi * (t - 10) / 20) + 1) / 2
    eta = lambda t, a, b: (math.sin(-math.pi / 2 + math.pi * (t - a) / (b - a)) + 1) / 2  # noqa: E731
    assert sched(20) == pytest.approx(0.01 + 0.5 * 0.04)  # midpoint: eta = 1/2
    assert sched(15) == pytest.approx(0.01 + eta(15, 10, 30) * 0.04)
    assert sched(30) == pytest.approx(0.05)
    # stage 3 ends at 0.5 * 100 = step 50, then holds
    assert sched(40) == pytest.approx(0.05 + 0.5 * 0.05)
    assert sched(50) == pytest.approx(0.1) and sched(99) == pytest.approx(0.1)
    # monotone rise within a stage
    values = [sched(s) for s in range(10, 51)]
    assert values == sorted(values)
