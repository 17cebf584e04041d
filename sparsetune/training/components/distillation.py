"""Distillation from the frozen original (dense SiLU) model, to keep quality while sparsifying.

Two terms, each off at weight 0: `distill_loss`, the KL from the teacher's logits (`distill.weight`), and
`mlp_distill_loss`, layer-wise MLP distillation (`distill.mlp_weight`): every sparse MLP's output is pulled toward
the original dense MLP's output on the same input, computed inside the training forward (no second forward).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsetune.activations.silu import SiLU
from sparsetune.recipe.schema import Recipe
from sparsetune.surgery.architectures import MLPLayout, layout_for
from sparsetune.surgery.sparse_mlp import SparseMLP, patched_mlps, sparse_mlps
from sparsetune.surgery.structure import base_causal_lm, decoder_mlps
from sparsetune.training.components.base import Component, LossTerm, Setup, StepContext


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student) on temperature-softened distributions, times T^2."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    q = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = F.kl_div(s, q, log_target=True, reduction="none").sum(-1)
    if token_mask is not None:
        m = token_mask.to(per_token.dtype)
        return (per_token * m).sum() / m.sum().clamp_min(1.0) * t * t
    return per_token.mean() * t * t


def normalized_mse(student: torch.Tensor, dense: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """||student - dense||^2 / ||dense||^2, both summed over the real tokens of the batch (float32).

    Normalized because MLP outputs differ in scale by orders of magnitude from layer to layer (the last layers'
    are the largest): a plain MSE would be the last layers' alone. A ratio of sums, not a mean of per-token ratios,
    so a token whose dense output is near zero cannot dominate."""
    return _ratio(*_squared_sums(student, dense, token_mask))


def _ratio(err: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return err / ref.clamp_min(torch.finfo(torch.float32).tiny)


def _squared_sums(student: torch.Tensor, dense: torch.Tensor,
                  token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(||student - dense||^2, ||dense||^2) over the real tokens (float32 scalars); the second carries no graph."""
    err = (student.float() - dense.float()).square().sum(-1)
    ref = dense.float().square().sum(-1)
    if token_mask is not None:
        m = token_mask.to(err.dtype)
        err, ref = err * m, ref * m
    return err.sum(), ref.sum().detach()


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` averaged over the data-parallel processes (itself in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


@contextlib.contextmanager
def dense_base(model):
    """The LoRA student as its own teacher: adapters off, dense SiLU, activations not recorded."""
    peft_model = model
    while hasattr(peft_model, "module") and not hasattr(peft_model, "disable_adapter"):
        peft_model = peft_model.module
    with patched_mlps(model, activation=SiLU(), sink=None), peft_model.disable_adapter():
        yield


def dense_reference(mlp: SparseMLP, layout: MLPLayout) -> SparseMLP:
    """The original SwiGLU MLP of `mlp`'s layer: SiLU over `mlp`'s own frozen projections (LoRA adapters left out).
    A SparseMLP outside the model, so `dense()` is the one dense MLP computation."""
    # peft wraps a projection; its base layer holds the original, frozen weights
    projections = [p.get_base_layer() if hasattr(p, "get_base_layer") else p for p in mlp.projections()]
    holder = nn.Module()
    for name, module in zip(mlp.layout_names, projections):
        holder.add_module(name, module)
    return SparseMLP(holder, layout, SiLU(), mlp.layer_idx).requires_grad_(False)


class MLPTargets:
    """Layer-wise MLP distillation, computed inside the student's forward: a forward hook on every SparseMLP runs
    the layer's dense reference on the same input (no graph) and keeps the normalized MSE of the student's output
    to it. Armed for the training forward only (`arm()` before it, `pop_loss()` after it), so evaluations, the LoRA
    teacher pass and gradient checkpointing's recomputation inside backward add nothing.

    `references`: layer -> (the function computing the layer's dense MLP, the dtype it computes in). The hook runs
    first among the MLP's forward hooks, while the parameters the forward gathered are still there (ZeRO-3 frees
    them in its own hook)."""

    def __init__(self, references: dict[int, tuple[Callable, torch.dtype]], recorder):
        self.references = references
        self.recorder = recorder  # its token mask marks the real tokens of the forward
        self.terms: list[torch.Tensor] = []
        self.armed = False

    def attach(self, student_mlps: list[SparseMLP]) -> None:
        for mlp in student_mlps:
            mlp.register_forward_hook(self._hook(*self.references[mlp.layer_idx]), prepend=True)

    def _hook(self, reference: Callable, dtype: torch.dtype):
        def hook(module, args, output):
            if not self.armed:
                return
            x = args[0].detach()
            with torch.no_grad():
                dense = reference(x.to(dtype)).to(output.dtype)
            mask = self.recorder.token_mask
            # Keep the graph of this term outside gradient checkpointing's pack hooks: the recomputation in
            # backward runs unarmed, so it would not save these tensors again.
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                self.terms.append(_squared_sums(output, dense, mask))

        return hook

    def arm(self) -> None:
        self.terms, self.armed = [], True

    def pop_loss(self) -> torch.Tensor | None:
        """Mean over layers of this forward's normalized MSE (`normalized_mse`); disarms.

        Each layer's denominator ||dense||^2 is the mean over the data-parallel ranks of theirs (one all-reduce of
        every layer's at once), so that N ranks of B rows each compute, and average gradients of, the same loss as
        one process of N x B rows: a per-rank ratio would differ from it (by ~0.5% on the tiny recipe)."""
        terms, self.terms, self.armed = self.terms, [], False
        if not terms:
            return None
        refs = _mean_over_ranks(torch.stack([ref for _, ref in terms]))
        return torch.stack([_ratio(err, ref) for (err, _), ref in zip(terms, refs)]).mean()


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in (ZeRO-3 keeps it on partitioned parameters as well)."""
    return next(module.parameters()).dtype


class Distillation(Component):
    """Teacher logits (`distill.weight`). Full fine-tune: a frozen copy of the model taken before surgery, placed
    like the student (sharded under ZeRO-3 and FSDP2). LoRA: the same model with adapters disabled and SiLU put back
    for the teacher pass (no copy).

    Layer-wise MLP targets (`distill.mlp_weight`): the original gate/up/down weights with SiLU. They come from the
    teacher when there is one; from the student's own frozen weights under LoRA (base layers) or
    `train.freeze_model`; otherwise from a frozen copy of the MLP weights taken before surgery. Every source is the
    model as loaded from `model.path`, before a resume restores the trained weights, so a resumed run distills
    toward the same targets."""

    name, order = "distillation", 20

    def __init__(self, recipe: Recipe):
        self.weight = recipe.distill.weight
        self.temperature = recipe.distill.temperature
        self.mlp_weight = recipe.distill.mlp_weight
        self.active = True
        self.lora = recipe.peft.method != "none"
        self.student_mlps_frozen = self.lora or recipe.train.freeze_model
        self.step_metric_keys = (("distill_loss",) if self.weight > 0 else ()) + (
            ("mlp_distill_loss",) if self.mlp_weight > 0 else ())
        self.mlp_copies: list[nn.Module] | None = None  # the original MLP modules, until after_prepare
        self.mlp_targets: MLPTargets | None = None

    @classmethod
    def build(cls, recipe: Recipe) -> Distillation | None:
        d = recipe.distill
        return cls(recipe) if d.weight > 0 or d.mlp_weight > 0 else None

    def before_surgery(self, setup: Setup) -> None:
        # Under ZeRO-3 transformers may load the student already partitioned (deepspeed.zero.Init); a copy of a
        # partitioned module holds empty tensors, so what is copied is then loaded a second time, partitioned alike.
        partitioned = any(hasattr(p, "ds_id") for p in setup.model.parameters())
        if self.weight > 0 and not self.lora:
            self.teacher = (setup.load_model() if partitioned else copy.deepcopy(setup.model)).eval()
            self.teacher.requires_grad_(False)
        elif self.mlp_weight > 0 and not self.student_mlps_frozen:
            # Full fine-tune without a teacher: copy only the MLP weights (not the whole model)
            mlps = decoder_mlps(setup.load_model() if partitioned else setup.model)
            self.mlp_copies = [(m if partitioned else copy.deepcopy(m)).requires_grad_(False) for m in mlps]

    def after_prepare(self, setup: Setup) -> None:
        if self.teacher is not None:
            self.teacher = setup.engine.prepare_teacher(self.teacher)
        if self.mlp_weight > 0:
            self.mlp_targets = MLPTargets(self._mlp_references(setup), setup.recorder)
            self.mlp_targets.attach(sparse_mlps(setup.model))

    def _mlp_references(self, setup: Setup) -> dict[int, tuple[Callable, torch.dtype]]:
        """Each layer's dense MLP: the student's own frozen weights (LoRA base layers, train.freeze_model), computed
        inside its forward; else the teacher's MLP as the engine placed it (a unit of its own under FSDP2, a ZeRO-3
        leaf); else the copy taken before surgery, placed by the engine like the layer (sharded alike)."""
        student = sparse_mlps(setup.model)
        layout = layout_for(base_causal_lm(setup.model).config.model_type)
        if self.student_mlps_frozen:
            refs = [dense_reference(m, layout) for m in student]
            return {r.layer_idx: (r.dense, r.projections()[0].weight.dtype) for r in refs}
        if self.teacher is not None:
            sources = decoder_mlps(self.teacher)
            return {m.layer_idx: (src, _dtype_of(src)) for m, src in zip(student, sources)}
        dtypes = [_dtype_of(c) for c in self.mlp_copies]
        copies, self.mlp_copies = setup.engine.place_references(self.mlp_copies), None
        return {m.layer_idx: (c, dtype) for m, c, dtype in zip(student, copies, dtypes)}

    def begin_step(self, step: int, model_trains: bool) -> None:
        self.active = model_trains  # no teacher work in the predictor-only phase

    def begin_micro(self, index: int) -> None:
        if self.mlp_targets is not None and self.active:
            self.mlp_targets.arm()

    @torch.no_grad()
    def teacher_logits(self, student_model, input_ids) -> torch.Tensor:
        if self.teacher is not None:
            return self.teacher(input_ids=input_ids).logits
        with dense_base(student_model):
            return student_model(input_ids=input_ids).logits

    def loss_terms(self, ctx: StepContext) -> list[LossTerm]:
        terms = []
        if not self.active:
            return terms
        mlp = self.mlp_targets.pop_loss() if self.mlp_targets is not None else None  # before the teacher pass
        if self.weight > 0:
            kl = kl_to_teacher(ctx.outputs.logits, self.teacher_logits(ctx.model, ctx.batch["input_ids"]),
                               self.temperature)
            terms.append(LossTerm("distill_loss", kl, self.weight * kl))
        if mlp is not None:
            terms.append(LossTerm("mlp_distill_loss", mlp, self.mlp_weight * mlp))
        return terms
