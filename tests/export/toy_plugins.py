"""toygate: ReLU(gate)*up zeroed where the gate is below a per-layer threshold calibrated on training data to
target_sparsity (a test plugin: tests/export/test_toy_plugins.py registers it and the `toy` export target from the
test tree, and nothing outside the test tree names either)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from sparsetune.activations.base import F, MLPActivation, per_layer_value, quantile_threshold, token_rows, torch
from sparsetune.activations.relu import ReLU
from sparsetune.export.targets import ExportJob, ExportTarget, HFForm
from sparsetune.export.targets.hf import express_plain
from sparsetune.recipe.section import Section


class Config(Section):
    activation: Literal["toygate"]
    target_sparsity: float = Field(0.6, gt=0.0, lt=1.0, description="toygate: share of gates below the threshold.")
    thresholds: list[float] | None = Field(None, description="toygate: per-layer gate thresholds (calibrated).")
    calibration_batches: int = Field(2, ge=1, description="toygate: training micro-batches the thresholds see.")


class _Gates:
    def __init__(self):
        self.values, self.mask = {}, None

    def record(self, layer, activation, mlp_input, gate) -> None:
        self.values.setdefault(layer, []).append(token_rows(gate.detach().float(), self.mask).reshape(-1).cpu())


class ToyGate(MLPActivation):
    """relu(gate) * [gate >= t] * up, t calibrated per layer at the start of the run."""

    name, needs_data, undropped = "toygate", True, "relu"

    def __init__(self, threshold: float, target_sparsity: float, calibration_batches: int = 2):
        self.threshold, self.target_sparsity = float(threshold), float(target_sparsity)
        self.calibration_batches = calibration_batches

    @classmethod
    def from_config(cls, cfg, layer: int) -> ToyGate:
        own = per_layer_value(cfg.thresholds, layer, "thresholds")
        return cls(float("nan") if own is None else own, cfg.target_sparsity, cfg.calibration_batches)

    def uncalibrated(self) -> bool:
        return math.isnan(self.threshold)

    def __call__(self, gate, up):
        a = F.relu(gate) * up
        return a if self.uncalibrated() else torch.where(gate >= self.threshold, a, torch.zeros_like(a))

    @classmethod
    def calibrate(cls, layers, measure, seed=0, report=None) -> list[float]:
        gates = _Gates()
        on = measure(gates, ReLU())
        for m in layers:
            m.activation.threshold = quantile_threshold(torch.cat(gates.values[m.layer_idx]),
                                                        m.activation.target_sparsity)
        if report is not None:
            report(f"toygate: calibrated {len(layers)} layer thresholds on {on}")
        return [m.activation.threshold for m in layers]

    def spec(self) -> dict:
        return {"activation": self.name, "target_sparsity": self.target_sparsity,
                "thresholds": [self.threshold], "calibration_batches": self.calibration_batches}


ACTIVATION = ToyGate


class ToyTarget(ExportTarget):
    """`toy`: the Hugging Face weights (sparsetune loads them with sparsetune.json) plus toy.json, the per-layer
    thresholds a toy engine would read; it refuses a model without exact zeros."""

    name = "toy"
    help = "a toy engine's folder: the HF weights and toy.json"
    files = ("toy.json",)

    def refusal(self, job: ExportJob) -> str | None:
        return None if job.mlps[0].activation.exact_zeros else "--target toy: the toy engine needs exact zeros"

    def express(self, job: ExportJob) -> HFForm:
        return express_plain(job)

    def write(self, job: ExportJob, folder: Path, form: HFForm) -> None:
        (folder / "toy.json").write_text(json.dumps({"thresholds": job.spec.get("thresholds")}))

    def report(self, job: ExportJob) -> dict:
        return {"toy": {"file": "toy.json"}}

    def card_rows(self, job: ExportJob, form: HFForm, used: bool) -> list[str]:
        return ["| toy engine | yes: toy.json |"] if used else []
