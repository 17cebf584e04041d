"""The per-layer predictors of a model, trained from the activations captured in the same forward pass.

The recorder hands each layer's MLP input x and activation a to `observe_mlp`; hooks on the
attention modules hand the attention input and per-head output to `observe_heads`. Each
call adds one loss term (inputs detached by default, so the model is unaffected) and updates
the confusion counts; nothing is stored beyond the current layer (one pending input for
lookahead).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from sparsetune.errors import SparsetuneError
from sparsetune.predictors.labels import balanced_bce, focal, head_norms, neuron_labels, top_fraction
from sparsetune.predictors.metrics import ConfusionCounts
from sparsetune.predictors.networks import build_predictors
from sparsetune.recipe.schema import PredictorSection
from sparsetune.sparsity.cett import contributions
from sparsetune.surgery.structure import readable_weight


class PredictorBank(nn.Module):
    def __init__(self, cfg: PredictorSection, hidden_size: int, intermediate_size: int, num_layers: int,
                 num_heads: int, exact_zeros: bool):
        super().__init__()
        self.cfg = cfg
        self.exact_zeros = exact_zeros
        self.num_layers, self.num_heads = num_layers, num_heads
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        # With lookahead, predictor j reads layer j's input and predicts layer j+1's neurons.
        self.num_neuron_predictors = num_layers - 1 if cfg.lookahead else num_layers
        if cfg.layer_ranks is not None and len(cfg.layer_ranks) != self.num_neuron_predictors:
            fewer = ", one fewer with lookahead" if cfg.lookahead else ""
            raise SparsetuneError(
                f"predictor.layer_ranks holds {len(cfg.layer_ranks)} ranks; this model needs one per neuron predictor: "
                f"{self.num_neuron_predictors} ({num_layers} layers{fewer})")
        self.neurons = build_predictors(self.num_neuron_predictors, hidden_size, self.layer_ranks, intermediate_size,
                                        cfg.nonlinearity, cfg.output_bias)
        self.heads = (build_predictors(num_layers, hidden_size, cfg.head_rank, num_heads, cfg.nonlinearity)
                      if cfg.heads else None)
        self.reset_counts()
        self.loss_terms: list[torch.Tensor] = []
        self._pending_input: torch.Tensor | None = None
        self._attn_inputs: dict[int, torch.Tensor] = {}
        self._stride = max(1, round(1.0 / cfg.train_token_fraction))
        self._offset = 0  # set from the global micro-batch index (set_position), so resume samples the same tokens
        # layer -> ||W_down[:, j]|| per neuron j (set by the run when the weights are local); importance of an active
        # neuron = |a_j| * that norm, its contribution to the MLP output. Without it, importance = |a_j|.
        self.down_norms: Callable[[int], torch.Tensor | None] | None = None
        # Per-layer logit thresholds calibrated to a recall / mass-recall target (predictors/calibration.py);
        # None: every layer uses the global predictor.threshold.
        self.layer_thresholds: list[float] | None = None
        self.calibration: dict | None = None  # how they were set (target, tokens), saved in predictors.json
        # predictor.input=residual: each layer's residual stream before its post-attention norm, set by the taps
        # bind() puts on the model during every forward, read by features()
        self._residuals: dict[int, torch.Tensor] = {}
        self._taps: list = []

    # ------------------------------------------------------------------ input
    def bind(self, model) -> PredictorBank:
        """Attach what the predictors need from `model`'s forward: with predictor.input=residual, a pre-hook on
        every decoder layer's post-attention norm keeps that layer's residual stream. Idempotent; a no-op for
        predictor.input=mlp_input."""
        if self.cfg.input != "residual" or self._taps:
            return self
        from sparsetune.surgery.structure import decoder_layers

        for idx, layer in enumerate(decoder_layers(model)):
            norm = getattr(layer, "post_attention_layernorm", None)
            if norm is None:
                raise SparsetuneError(f"predictor.input=residual: decoder layer {idx} of this model has no "
                                      "post_attention_layernorm to read the residual stream from; use "
                                      "predictor.input=mlp_input")

            def keep(module, args, kwargs, idx=idx):
                self._residuals[idx] = kwargs.get("hidden_states", args[0] if args else None)

            self._taps.append(norm.register_forward_pre_hook(keep, with_kwargs=True))
        return self

    def features(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        """What predictor `idx` reads for the MLP input x of its layer: x itself, or (predictor.input=residual)
        the same tokens' residual stream before the norm, kept by the taps of this forward."""
        if self.cfg.input != "residual":
            return x
        residual = self._residuals.get(idx)
        if residual is None or residual.shape != x.shape:
            raise RuntimeError(f"predictor.input=residual: no residual stream of layer {idx} for this forward "
                               "(call bank.bind(model) before running the model)")
        return residual

    # ------------------------------------------------------------------ sizes
    @property
    def layer_ranks(self) -> list[int]:
        """Each neuron predictor's rank: predictor.layer_ranks, or predictor.rank for every layer."""
        cfg = self.cfg
        return list(cfg.layer_ranks) if cfg.layer_ranks is not None else [cfg.rank] * self.num_neuron_predictors

    def neuron_param_fraction(self) -> float:
        """Neuron-predictor parameters / MLP parameters (3 * d * m per layer)."""
        mlp = 3 * self.hidden_size * self.intermediate_size * self.num_layers
        return sum(p.numel() for p in self.neurons.parameters()) / mlp

    # ---------------------------------------------------------------- observe
    def reset_counts(self) -> None:
        self.counts = ConfusionCounts(self.num_neuron_predictors)
        self.head_counts = ConfusionCounts(self.num_layers) if self.cfg.heads else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.cfg.detach_inputs else x

    def set_position(self, micro_batch_index: int) -> None:
        """Token sampling offset for this forward: a function of training progress only."""
        self._offset = micro_batch_index % self._stride

    def _sample(self, *tensors: torch.Tensor | None) -> list:
        """While training: every `stride`-th token (flattened), starting at this forward's offset."""
        if not self.training or self._stride == 1:
            return list(tensors)
        return [None if t is None else t.reshape(-1, *t.shape[2:])[self._offset::self._stride] if t.dim() > 2
                else t.reshape(-1)[self._offset::self._stride] for t in tensors]

    def _add(self, logits: torch.Tensor, labels: torch.Tensor, counts: ConfusionCounts, idx: int,
             token_mask: torch.Tensor | None, importance: torch.Tensor, threshold: float) -> None:
        if token_mask is not None:
            keep = token_mask.reshape(-1).bool()
            logits, labels = logits.reshape(-1, logits.shape[-1])[keep], labels.reshape(-1, labels.shape[-1])[keep]
            importance = importance.reshape(-1, importance.shape[-1])[keep]
        if self.training:
            if self.cfg.loss == "focal":
                loss = focal(logits, labels, self.cfg.focal_gamma)
            else:
                weights = importance if self.cfg.label_weighting == "importance" else None
                loss = balanced_bce(logits, labels, weights)
            self.loss_terms.append(loss)
        with torch.no_grad():
            counts.add(idx, logits >= threshold, labels, importance)

    def neuron_importance(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """Each neuron's contribution to the MLP output: |a_j| * ||W_down[:, j]|| (|a_j| without the norms)."""
        return contributions(a, self.down_norms(layer) if self.down_norms is not None else None)

    def observe_mlp(self, layer: int, a: torch.Tensor, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        labels = neuron_labels(a.detach(), self.exact_zeros, self.cfg.silu_active_fraction)
        if self.cfg.lookahead:
            source, self._pending_input = self._pending_input, x
            if layer == 0 or source is None:
                return
            idx = layer - 1
        else:
            source, idx = self.features(layer, x), layer
        source, labels, token_mask, a = self._sample(source, labels, token_mask, a)
        importance = self.neuron_importance(layer, a)
        # The predictor trains even when the model runs under no_grad (train.freeze_model).
        with torch.enable_grad() if self.training else torch.no_grad():
            self._add(self.neurons[idx](self._input(source)), labels, self.counts, idx, token_mask, importance,
                      self.threshold_for(idx))

    def observe_attention_input(self, layer: int, hidden: torch.Tensor) -> None:
        self._attn_inputs[layer] = hidden

    def observe_heads(self, layer: int, attn_out: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        hidden = self._attn_inputs.pop(layer, None)
        if hidden is None or self.heads is None:
            return
        norms = head_norms(attn_out.detach(), self.num_heads).float()  # a head's importance: its output norm
        labels = top_fraction(norms, self.cfg.head_active_fraction)
        hidden, labels, token_mask, norms = self._sample(hidden, labels, token_mask, norms)
        with torch.enable_grad() if self.training else torch.no_grad():
            self._add(self.heads[layer](self._input(hidden)), labels, self.head_counts, layer, token_mask, norms,
                      self.logit_threshold)

    def pop_loss(self) -> torch.Tensor | None:
        """Mean of this forward's loss terms (None when none were recorded)."""
        terms, self.loss_terms = self.loss_terms, []
        self._pending_input = None
        self._attn_inputs.clear()
        return torch.stack(terms).mean() if terms else None

    # ---------------------------------------------------------------- predict
    @property
    def logit_threshold(self) -> float:
        """sigmoid(logit) >= threshold  <=>  logit >= log(t / (1 - t)): no sigmoid over every logit."""
        t = self.cfg.threshold
        return math.log(t / (1.0 - t))

    def threshold_for(self, idx: int) -> float:
        """The logit threshold of neuron predictor `idx`: calibrated per layer, else the global one."""
        return self.layer_thresholds[idx] if self.layer_thresholds is not None else self.logit_threshold

    @torch.no_grad()
    def neuron_mask(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        """Predicted-active neurons (bool) of predictor `idx` for inputs x."""
        return self.neurons[idx](self.features(idx, x)) >= self.threshold_for(idx)

    @torch.no_grad()
    def head_mask(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.heads[layer](hidden) >= self.logit_threshold

    # -------------------------------------------------------------- save/load
    def spec(self) -> dict:
        return {"format": "sparsetune.predictors.v1", "config": self.cfg.model_dump(mode="json"),
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_layers": self.num_layers, "num_heads": self.num_heads, "exact_zeros": self.exact_zeros,
                "neuron_param_fraction": self.neuron_param_fraction(),
                "layer_logit_thresholds": self.layer_thresholds, "calibration": self.calibration}

    def save(self, folder: Path, metrics: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "predictors.safetensors"))
        (folder / "predictors.json").write_text(json.dumps({**self.spec(), "metrics": metrics or {}}, indent=1))

    @classmethod
    def from_spec(cls, spec: dict) -> PredictorBank:
        bank = cls(PredictorSection(**spec["config"]), spec["hidden_size"], spec["intermediate_size"],
                   spec["num_layers"], spec["num_heads"], spec["exact_zeros"])
        bank.layer_thresholds = spec.get("layer_logit_thresholds")
        bank.calibration = spec.get("calibration")
        return bank


def down_norm_reader(mlps: list) -> Callable[[int], torch.Tensor | None]:
    """layer -> ||W_down[:, j]|| for every neuron j of `mlps` (SparseMLPs), read from the live weights at each call
    (they train); None when the weights are sharded (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions), and the
    importance of a neuron is then |a_j| alone."""

    def norms(layer: int) -> torch.Tensor | None:
        weight = readable_weight(mlps[layer].projections()[2])  # inside the layer's forward: gathered
        if weight is None:
            return None
        with torch.no_grad():
            return weight.detach().float().norm(dim=0)

    return norms


# predictors.json keys that `from_spec` needs, with their JSON types. `save` writes them; any other shape means the
# file was edited or damaged, and is refused naming the key rather than failing deep inside torch.
_SPEC_KEYS = {"config": (dict, "an object"), "hidden_size": (int, "a positive integer"),
              "intermediate_size": (int, "a positive integer"), "num_layers": (int, "a positive integer"),
              "num_heads": (int, "a positive integer"), "exact_zeros": (bool, "true or false")}


def _read_spec(spec_file: Path) -> dict:
    """predictors.json, checked key by key (one-line SparsetuneError naming the file and the key)."""
    try:
        spec = json.loads(spec_file.read_bytes())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise SparsetuneError(f"{spec_file} is not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise SparsetuneError(f"{spec_file} must hold a JSON object, got {json.dumps(spec)[:40]}")
    for key, (kind, expected) in _SPEC_KEYS.items():
        if key not in spec:
            raise SparsetuneError(f"{spec_file} has no key {key!r} (expected {expected})")
        value = spec[key]
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            raise SparsetuneError(f"{spec_file}: key {key!r} must be {expected}, got {value!r}")
    try:  # strict: the file holds exact JSON types, so "4" for a rank was typed by hand
        PredictorSection.model_validate_json(json.dumps(spec["config"]), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(map(str, ("config", *err["loc"])))
        raise SparsetuneError(f"{spec_file}: key {key!r}: {err['msg']} (got {err.get('input')!r})") from None
    thresholds = spec.get("layer_logit_thresholds")
    if thresholds is not None and not (isinstance(thresholds, list) and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in thresholds)):
        raise SparsetuneError(f"{spec_file}: key 'layer_logit_thresholds' must be null or a list of numbers, "
                              f"got {thresholds!r}")
    return spec


def _shape_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """The first tensor whose presence or shape differs between what predictors.json describes and the weights."""
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            return f"the weights lack {name} (shape {list(expected[name])})"
        if name not in expected:
            return f"the weights hold {name}, which predictors.json does not describe"
        if expected[name] != found[name]:
            return f"{name} has shape {list(found[name])} in the weights but {list(expected[name])} by predictors.json"
    return None


def load_predictors(folder: str | Path) -> PredictorBank:
    """Predictors written by `sparsetune export` (or a checkpoint), ready to use (eval mode).

    An edited or damaged predictors.json / predictors.safetensors gives a one-line SparsetuneError naming the file
    and what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_file, weights_file = folder / "predictors.json", folder / "predictors.safetensors"
    if not spec_file.is_file():
        raise SparsetuneError(f"{folder} has no predictors.json (was the run trained with predictor.enabled=true?)")
    spec = _read_spec(spec_file)
    bank = PredictorBank.from_spec(spec)
    if bank.layer_thresholds is not None and len(bank.layer_thresholds) != bank.num_neuron_predictors:
        raise SparsetuneError(f"{spec_file}: key 'layer_logit_thresholds' holds {len(bank.layer_thresholds)} "
                              f"thresholds, expected one per neuron predictor ({bank.num_neuron_predictors})")
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise SparsetuneError(f"{weights_file} could not be read ({str(exc).strip().splitlines()[0]})") from None
    mismatch = _shape_mismatch({k: tuple(v.shape) for k, v in bank.state_dict().items()},
                               {k: tuple(v.shape) for k, v in weights.items()})
    if mismatch:
        raise SparsetuneError(f"{spec_file} does not match {weights_file.name}: {mismatch} (was predictors.json "
                              "edited?)")
    bank.load_state_dict(weights)
    return bank.eval()
