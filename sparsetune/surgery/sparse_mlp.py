"""`SparseMLP`: a SwiGLU MLP with a swappable activation, and the one way to patch it temporarily.

`SparseMLP` keeps the original projection modules under their original names, so the model's state dict (and LoRA
target names) are exactly those of the Hugging Face model. It has two extension points:

  sink      an observer handed every forward's activation once: `record(layer, a, mlp_input, gate)`
            (the run's ActivationRecorder; calibration's collector)
  override  a replacement computation `override(mlp, x) -> output` (dynamic evaluation, sparse decoding)

`patched_mlps(model, ...)` swaps activation / sink / override on every SparseMLP and restores them on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from sparsetune.activations import MLPActivation
from sparsetune.errors import SparsetuneError
from sparsetune.surgery.architectures import MLPLayout
from sparsetune.surgery.structure import readable_weight


class ActivationSink(Protocol):
    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate: torch.Tensor) -> None: ...


class SparseMLP(nn.Module):
    """A SwiGLU MLP with a swappable activation that reports its activation once per forward."""

    def __init__(self, original: nn.Module, layout: MLPLayout, activation: MLPActivation, layer_idx: int):
        super().__init__()
        self.layout_names = (layout.gate, layout.up, layout.down)
        for name in self.layout_names:
            self.add_module(name, getattr(original, name))
        self.activation = activation
        self.layer_idx = layer_idx
        self.sink: ActivationSink | None = None
        self.override: Callable[[SparseMLP, torch.Tensor], torch.Tensor] | None = None
        self.anneal = 1.0  # annealed surgery's progress from SiLU to `activation` (training/components/annealing.py)
        # the dropped-activation compensation: a bias added to the MLP output (sparsity/compensation.py), or None
        self.register_buffer("compensation", None, persistent=False)
        self.original_class = type(original)

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return tuple(getattr(self, n) for n in self.layout_names)  # type: ignore[return-value]

    def dense(self, x: torch.Tensor, sink: ActivationSink | None = None,
              mask: Callable[[SparseMLP, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
        """The MLP on every neuron: down(act(gate(x), up(x))), the activation handed to `sink` if given. With
        `mask(mlp, x)` (a bool mask or None), down sees a * mask: the mask-aware forward of training."""
        gate_proj, up_proj, down_proj = self.projections()
        gate, up = gate_proj(x), up_proj(x)
        a = self.activation(gate, up) if self.anneal >= 1.0 else self.activation.annealed(gate, up, self.anneal)
        if sink is not None:
            sink.record(self.layer_idx, a, x, gate)
        keep = mask(self, x) if mask is not None else None
        return self.compensate(down_proj(a if keep is None else a * keep.to(a.dtype)))

    def down_weight(self) -> torch.Tensor | None:
        """The down projection's full weight (LoRA merged in), None where only a shard is here
        (`structure.readable_weight`)."""
        return readable_weight(self.projections()[2])

    def compensate(self, out: torch.Tensor) -> torch.Tensor:
        """The MLP output plus the compensation bias, when the model has one."""
        return out if self.compensation is None else out + self.compensation.to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.override is not None:
            return self.override(self, x)
        return self.dense(x, self.sink)


def sparse_mlps(model: nn.Module) -> list[SparseMLP]:
    """Every SparseMLP of `model` (wrapped or not), in layer order."""
    return [m for m in model.modules() if isinstance(m, SparseMLP)]


_KEEP = object()


@contextlib.contextmanager
def patched_mlps(model: nn.Module, activation=_KEEP, sink=_KEEP, override=_KEEP):
    """Within: every SparseMLP of `model` uses the given activation (a module, or a function of the SparseMLP
    giving one), sink and/or override; whatever is not given stays. Everything is restored on exit."""
    mlps = sparse_mlps(model)
    changes = {k: v for k, v in (("activation", activation), ("sink", sink), ("override", override)) if v is not _KEEP}
    saved = [{k: getattr(m, k) for k in changes} for m in mlps]
    try:
        for m in mlps:
            for key, value in changes.items():
                setattr(m, key, value(m) if key == "activation" and not isinstance(value, MLPActivation)
                        else value)
        yield mlps
    finally:
        for m, old in zip(mlps, saved):
            for key, value in old.items():
                setattr(m, key, value)


@torch.no_grad()
def measuring_pass(model: nn.Module, batches, device, sink, activation=_KEEP, progress=None) -> int:
    """The one "run with a sink, then restore" pass every calibration uses: `model` in eval mode, its SparseMLPs
    handing their activations to `sink` (with `activation` swapped in if given), one forward per batch; the sink's
    `mask` attribute, when it has one, is set to the batch's attention mask first. Training mode, activations and
    sinks are restored on exit, also after an error. `progress`: a wrapper for the batch iterable (tqdm).
    Returns the number of tokens run."""
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        with patched_mlps(model, activation=activation, sink=sink):
            for batch in (progress(batches) if progress else batches):
                mask = batch.get("attention_mask")
                mask = mask.to(device) if mask is not None else None
                if hasattr(sink, "mask"):
                    sink.mask = mask
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
                tokens += batch["input_ids"].numel()
    finally:
        model.train(was_training)
    return tokens


def apply_compensation(model, biases: list, trainable: bool = False) -> None:
    """Every SparseMLP adds its layer's bias from now on (an nn.Parameter when `trainable`, else a buffer)."""
    mlps = sparse_mlps(model)
    if len(biases) != len(mlps):
        raise SparsetuneError(f"{len(biases)} compensation biases for a model with {len(mlps)} MLP layers")
    for m, b in zip(mlps, biases):
        down = m.projections()[2]
        ref = getattr(down, "weight", None)
        t = torch.as_tensor(b, dtype=torch.float32, device=ref.device if ref is not None else "cpu")
        if trainable:
            if isinstance(m.compensation, torch.nn.Parameter):
                m.compensation.data.copy_(t)
            else:
                m.compensation = torch.nn.Parameter(t)
        else:
            m.compensation = t
