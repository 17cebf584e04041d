"""relu6: min(max(gate, 0), 6)*up (a test plugin: tests/activations/test_plugin.py adds this file to a copy of
sparsetune/activations/ and nothing else)."""

from __future__ import annotations

from typing import Literal

from sparsetune.activations.base import MLPActivation, torch
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["relu6"]


class ReLU6(MLPActivation):
    name = "relu6"  # transformers' ACT2FN has relu6 computing the same: the `hf` export target finds it exact

    def __call__(self, gate, up):
        return torch.clamp(gate, 0.0, 6.0) * up


ACTIVATION = ReLU6
