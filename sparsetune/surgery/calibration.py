"""The calibration step of the lifecycle: fit the per-layer state activations need from data before a run (CATS's
thresholds, output_aware's score scales). Each activation fits itself (`MLPActivation.calibrate`); this module
finds the layers still to fit and hands each activation class the one measuring pass."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm

from sparsetune.surgery.sparse_mlp import measuring_pass, sparse_mlps


def needs_calibration(model) -> bool:
    """Some activation's per-layer state is still to be fitted on data (CATS before calibration)."""
    return any(m.activation.uncalibrated() for m in sparse_mlps(model))


def calibration_batches(model) -> int:
    """How many training micro-batches the model's uncalibrated activations are fitted on."""
    return max(m.activation.calibration_batches for m in sparse_mlps(model) if m.activation.uncalibrated())


def calibrate(model, batches: Iterable[dict], device, total: int | None = None, seed: int = 0,
              progress: bool = True, report=None) -> list[float]:
    """Fit (and return: thresholds, one per layer, or [] when the activation fits none) the per-layer state of
    every uncalibrated activation on the real tokens of `batches`. Identical on every rank given identical batches.
    `report`: a function printing the one-line summary."""
    groups: dict[type, list] = {}
    for m in sparse_mlps(model):
        if m.activation.uncalibrated():
            groups.setdefault(type(m.activation), []).append(m)
    batches = iter(batches)  # one pass over the batches in all: a model has one activation class
    fitted: list[float] = []
    for cls, layers in groups.items():
        def measure(sink, activation, cls=cls) -> str:
            used = [0]  # the batches there were: fewer than `total` when the training data is short

            def counted(items):
                for item in items:
                    used[0] += 1
                    yield item

            measuring_pass(model, counted(batches), device, sink, activation=activation,
                           progress=lambda b: tqdm(b, total=total, desc=f"calibrating {cls.name}", unit="batch",
                                                   disable=not progress))
            return f"{used[0]} training micro-batches" + (
                f" (all there are; {total} were asked for)" if total and used[0] < total else "")

        fitted += cls.calibrate(layers, measure, seed=seed, report=report)
    return fitted
