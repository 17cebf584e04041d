"""What an MLP activation is (the protocol of `activations/`): its math and the per-layer state it keeps.

An activation maps the (gate, up) projections of a SwiGLU MLP to the activation `a` that feeds down_proj; sparsity
is measured and regularized on `a`. A plugin module in this package defines:

  Config          its recipe section (a `Section` with `activation: Literal["name"]` and its own keys); the module
                  docstring's first paragraph documents it in docs/RECIPES.md
  ACTIVATION      its `MLPActivation` subclass: the math (`__call__`, `annealed`, `elementwise`, `gate_shift`), the
                  per-layer state (`from_config`, `spec`, `per_layer_keys`), and the lifecycle's hooks (`calibrate`,
                  `unfixed_target`, `recipe_defaults`; a threshold form's `thresholded_from` / `rule_values` /
                  `with_threshold`)

Nothing here is about an engine, a kernel or a file format: an export target (export/targets/) or a kernel
(dynamic/kernels.py) asks the activation for its math (`computes`) and decides itself whether it can run it.

Torch is imported on first use (`torch` / `F` here), so the recipe schema reads every plugin without loading it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import model_validator

from sparsetune.errors import SparsetuneError
from sparsetune.recipe.section import Section


class _OnFirstUse:
    """A module imported when one of its attributes is first read."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


torch = _OnFirstUse("torch")
F = _OnFirstUse("torch.nn.functional")

# A measuring pass the lifecycle hands to `calibrate`: measure(sink, activation) runs the calibration batches through
# the model with `sink` on every SparseMLP (`activation` computed meanwhile) and says what it ran on ("8 training
# micro-batches").
Measure = Callable[[Any, "MLPActivation"], str]


class MLPActivation:
    """One layer's activation. Class attributes say what its math is and what state it keeps:

    name            the recipe's `relufy.activation`
    exact_zeros     inactive neurons are exactly 0, so sparsity is counted in exact zeros (every one but SiLU)
    rule_reads      what decides a zero: "gate" (the gate alone), "product" (gate and up), "none" (no exact zeros)
    undropped       the elementwise activation whose values its zeros are cut from (cats: silu), or None: what
                    dropped-activation compensation adds back the mean of (sparsity/compensation.py)
    threshold_form  the per-layer exact-zero rule the `thresholds` section converts a run of it to, or None
    per_layer_keys  spec keys holding one value per decoder layer -> the attribute holding this layer's value
                    (the model's spec lists every layer's: surgery/relufy.activation_spec)
    needs_data      its per-layer state is fitted on data at the start of a run (`calibrate`), on
                    `calibration_batches` training micro-batches
    threshold_floor a threshold form's lowest threshold (fatrelu: 0, a negative one would pass negative gates)
    """

    name: ClassVar[str] = ""
    exact_zeros: ClassVar[bool] = True
    rule_reads: ClassVar[str] = "gate"
    undropped: ClassVar[str | None] = None
    threshold_form: ClassVar[str | None] = None
    per_layer_keys: ClassVar[dict[str, str]] = {"thresholds": "threshold"}
    needs_data: ClassVar[bool] = False
    calibration_batches: int = 0
    threshold_floor: ClassVar[float | None] = None

    # ------------------------------------------------------------------ the math and the state
    @classmethod
    def from_config(cls, cfg, layer: int) -> MLPActivation:
        """This activation for decoder layer `layer` from its validated recipe section."""
        return cls()

    def __call__(self, gate, up):
        raise NotImplementedError

    def spec(self) -> dict:
        """JSON description (a `relufy` section), stored with checkpoints and exports to rebuild the activation."""
        return {"activation": self.name}

    def annealed(self, gate, up, progress: float):
        """The activation `progress` (0..1) of the way from the model's SiLU(gate) * up to this one, for annealed
        surgery (recipe `anneal`): an interpolation by default (0 = the dense model exactly, 1 = this activation);
        an activation with a natural path (a rising top-k or threshold share) overrides it."""
        dense = F.silu(gate) * up
        return dense if progress <= 0 else torch.lerp(dense, self(gate, up), progress)

    def elementwise(self) -> MLPActivation:
        """The per-neuron function, for computing a chosen subset of neurons (itself unless the activation looks
        across neurons, as top-k does)."""
        return self

    def gate_shift(self) -> tuple[MLPActivation, float] | None:
        """(inner, b) when this activation is inner(gate - b, up) for a stateless `inner`, else None: a fold of
        the shift into a gate bias computes it with `inner` (export targets read this)."""
        return None

    def computes(self, fn: Callable, width: int = 64) -> bool:
        """Whether this activation equals `fn(gate, up)` on a probe of `width` neurons per row: gates over a dense
        grid and down to 1e-12 in magnitude (where thresholds cut), random ups. How a target or kernel asks whether
        a function it implements is this activation's math."""
        gate, up = probe(width)
        with torch.no_grad():
            ours, theirs = self(gate, up), fn(gate, up)
        return bool(torch.allclose(ours, theirs, rtol=1e-5, atol=1e-30))

    # ------------------------------------------------------------------ the lifecycle's hooks
    def uncalibrated(self) -> bool:
        """Its per-layer state is still to be fitted on data (`calibrate`, needs_data activations)."""
        return False

    @classmethod
    def calibrate(cls, layers: list, measure: Measure, seed: int = 0,
                  report: Callable[[str], None] | None = None) -> list[float]:
        """Fit the per-layer state of `layers` (SparseMLPs computing this class, still uncalibrated: `.layer_idx`,
        `.activation`, `.projections()`, `.down_weight()`) on data through `measure`, setting it on each layer's
        activation; `report` prints the one-line summary. Returns the fitted per-layer thresholds ([] for none)."""
        return []

    def unfixed_target(self) -> float | None:
        """The sparsity a fixed rule (`threshold_form`) must be fitted to before the model is used as it is, when
        its rule is for training only (output_aware's per-batch quantile); None when it is fixed already."""
        return None

    @classmethod
    def recipe_defaults(cls, cfg, recipe) -> None:
        """Fill in the defaults this activation's section `cfg` implies for the rest of `recipe` (called by the
        schema's checks before its own defaults)."""

    # ------------------------------------------------------------------ a threshold form (sparsity/thresholds.py)
    @classmethod
    def thresholded_from(cls, current: MLPActivation | None) -> MLPActivation:
        """This form's rule for a layer computing `current`, before its threshold is fitted (the `thresholds`
        conversion compares `rule_values`, then sets `with_threshold`)."""
        raise NotImplementedError(f"{cls.name} is not a threshold form")

    def rule_values(self, gate, up):
        """The per-neuron value (float32) this rule compares with its threshold; `up` is None when `rule_reads` is
        "gate"."""
        raise NotImplementedError(f"{self.name} is not a threshold form")

    def with_threshold(self, threshold: float, sparsity: float = 0.5) -> MLPActivation:
        """This rule with a fixed threshold (`sparsity`: the share it zeroed where it was fitted)."""
        raise NotImplementedError(f"{self.name} is not a threshold form")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


def probe(width: int = 64):
    """Deterministic (gate, up) of `width` columns for `MLPActivation.computes`: a dense grid over [-12, 12] and
    +-10^k down to 1e-12, ups normal with a fixed seed."""
    grid = torch.linspace(-12.0, 12.0, 2049)
    small = torch.logspace(-12, 1, 209)
    values = torch.cat([grid, small, -small])
    rows = -(-values.numel() // width)
    gate = torch.cat([values, values[: rows * width - values.numel()]]).reshape(rows, width)
    up = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    return gate, up


def quantile_threshold(values, target: float, floor: float | None = None) -> float:
    """The one quantile rule of every threshold calibration: the threshold below which `target` of `values` lie
    (the (k+1)-th smallest value, k = round(target * n), so exactly k values fall below it when they are distinct),
    at least `floor`. A rule keeping `value >= threshold` then zeroes k of n."""
    flat = values.reshape(-1).float()
    k = min(max(0, round(target * flat.numel())), flat.numel())
    if k == flat.numel():
        top = flat.max()
        t = float(torch.nextafter(top, top.new_tensor(float("inf"))))
    else:
        t = float(flat.kthvalue(k + 1).values)
    return t if floor is None else max(t, floor)


def token_rows(t, mask):
    """The rows of `t` ([batch, seq, width]) at the real tokens of `mask` (all rows when it is None)."""
    return t[mask.bool()] if mask is not None else t.reshape(-1, t.shape[-1])


class PerLayerThresholds(Section):
    """A recipe section whose `thresholds` field (declared by the subclass) holds one threshold per decoder layer,
    each >= 0."""

    @model_validator(mode="after")
    def _thresholds_valid(self) -> PerLayerThresholds:
        if self.thresholds is not None and any(t < 0 for t in self.thresholds):
            raise ValueError("relufy.thresholds must be >= 0")
        return self


def per_layer_value(values: list[float] | None, layer: int, key: str) -> float | None:
    """Layer `layer`'s entry of a per-layer list from the recipe (None when the list is not given)."""
    if not values:
        return None
    if layer >= len(values):
        raise SparsetuneError(f"relufy.{key} has {len(values)} values but the model has more layers")
    return values[layer]
