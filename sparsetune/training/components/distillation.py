"""Distillation from the frozen original (dense SiLU) model, to keep quality while sparsifying."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from sparsetune.recipe.schema import Recipe
from sparsetune.surgery.activations import SiLU
from sparsetune.surgery.sparse_mlp import patched_mlps
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


@contextlib.contextmanager
def dense_base(model):
    """The LoRA student as its own teacher: adapters off, dense SiLU, activations not recorded."""
    peft_model = model
    while hasattr(peft_model, "module") and not hasattr(peft_model, "disable_adapter"):
        peft_model = peft_model.module
    with patched_mlps(model, activation=SiLU(), sink=None), peft_model.disable_adapter():
        yield


class Distillation(Component):
    """Teacher logits. Full fine-tune: a frozen copy of the model taken before surgery, placed like the student
    (sharded under ZeRO-3 and FSDP2). LoRA: the same model with adapters disabled and SiLU put back for the
    teacher pass (no copy)."""

    name, order = "distillation", 20
    step_metric_keys = ("distill_loss",)

    def __init__(self, recipe: Recipe):
        self.weight = recipe.distill.weight
        self.temperature = recipe.distill.temperature
        self.lora = recipe.peft.method != "none"

    @classmethod
    def build(cls, recipe: Recipe) -> Distillation | None:
        return cls(recipe) if recipe.distill.weight > 0 else None

    def before_surgery(self, setup: Setup) -> None:
        if self.lora:
            return
        # Under ZeRO-3 transformers may load the student already partitioned (deepspeed.zero.Init); a copy of a
        # partitioned module holds empty tensors, so the teacher is then loaded a second time, partitioned alike.
        partitioned = any(hasattr(p, "ds_id") for p in setup.model.parameters())
        self.frozen_model = (setup.load_model() if partitioned else copy.deepcopy(setup.model)).eval()
        self.frozen_model.requires_grad_(False)

    def after_prepare(self, setup: Setup) -> None:
        if self.frozen_model is not None:
            self.frozen_model = setup.engine.prepare_frozen(self.frozen_model)

    @torch.no_grad()
    def teacher_logits(self, student_model, input_ids) -> torch.Tensor:
        if self.frozen_model is not None:
            return self.frozen_model(input_ids=input_ids).logits
        with dense_base(student_model):
            return student_model(input_ids=input_ids).logits

    def loss_terms(self, ctx: StepContext) -> list[LossTerm]:
        kl = kl_to_teacher(ctx.outputs.logits, self.teacher_logits(ctx.model, ctx.batch["input_ids"]),
                           self.temperature)
        return [LossTerm("distill_loss", kl, self.weight * kl)]
