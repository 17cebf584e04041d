"""What an MLP activation is, for every part of sparsetune that handles one (the protocol of `activations/`).

An activation maps the (gate, up) projections of a SwiGLU MLP to the activation `a` that feeds down_proj; sparsity
is measured and regularized on `a`. A plugin module in this package defines:

  Config          its recipe section (a `Section` with `activation: Literal["name"]` and its own keys); the module
                  docstring's first paragraph documents it in docs/RECIPES.md
  ACTIVATION      its `MLPActivation` subclass: the math (`__call__`), `from_config`, `spec`, and the facts below

Torch is imported on first use (`torch` / `F` here), so the recipe schema reads every plugin without loading it.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from pydantic import model_validator

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


class MLPActivation:
    """One layer's activation. Class attributes say what the rest of sparsetune needs to know:

    name            the recipe's `relufy.activation`
    exact_zeros     inactive neurons are exactly 0, so sparsity is counted in exact zeros (every one but SiLU)
    hf_hidden_act   the transformers `hidden_act` computing exactly this (the export sets it), or None
    hf_aliases      other `hidden_act` names a plain model folder may carry for it (silu: swish)
    plain_fallback  what plain transformers computes instead when hf_hidden_act is None (the export's config)
    threshold_form  the per-layer exact-zero rule the `thresholds` section converts a run of it to, or None
    needs_data      its per-layer state is fitted on data at the start of a run (CATS), on `calibration_batches`
                    training micro-batches
    skips           which MLP rows an engine can skip from its zeros without predictors: "gate" when the rule reads
                    the gate alone (up and down rows of a zero neuron are skipped), "product" when it needs up too
                    (only the down row), "none" (no exact zeros)
    fused_code      the fused batch-1 decode kernel's code for it (dynamic/kernels.py), or None (gather kernel)
    powerinfer_refusal  why PowerInfer's llama path cannot run it truthfully, or None when it can
    undropped       the elementwise activation whose values its zeros are cut from (cats: silu), or None: what
                    dropped-activation compensation adds back the mean of (sparsity/compensation.py)
    per_layer_keys  spec keys holding one value per decoder layer -> the attribute holding this layer's value
                    (the model's spec lists every layer's: surgery/relufy.activation_spec)
    """

    name: ClassVar[str] = ""
    exact_zeros: ClassVar[bool] = True
    hf_hidden_act: ClassVar[str | None] = None
    hf_aliases: ClassVar[tuple[str, ...]] = ()
    plain_fallback: ClassVar[str] = "relu"
    threshold_form: ClassVar[str | None] = None
    needs_data: ClassVar[bool] = False
    calibration_batches: int = 0
    skips: ClassVar[str] = "gate"
    fused_code: ClassVar[int | None] = None
    powerinfer_refusal: ClassVar[str | None] = "PowerInfer's llama path computes relu(gate) * up only"
    per_layer_keys: ClassVar[dict[str, str]] = {"thresholds": "threshold"}
    undropped: ClassVar[str | None] = None

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

    def uncalibrated(self) -> bool:
        """Its per-layer state is still to be fitted on data (needs_data activations before calibration)."""
        return False

    def export_plain(self, lm, mlps, layout) -> tuple[dict, str] | None:
        """Make plain transformers compute this activation by changing the model itself (weights, config), when
        hf_hidden_act alone cannot: returns (the activation sparsetune applies on load, a note for the model card),
        or None when it cannot. Called on the model about to be saved."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


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
        from sparsetune.errors import SparsetuneError

        raise SparsetuneError(f"relufy.{key} has {len(values)} values but the model has more layers")
    return values[layer]
