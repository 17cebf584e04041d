"""Distillation from the frozen original (dense SiLU) model, to keep quality while sparsifying."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from sparsetune.surgery.activations import SiLU
from sparsetune.surgery.relufy import sparse_mlps


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


class Teacher:
    """Teacher logits. Full fine-tune: a frozen copy of the model taken before surgery.
    LoRA: the same model with adapters disabled and SiLU put back for the teacher pass (no copy)."""

    def __init__(self, frozen_copy=None):
        """`frozen_copy`: the dense model before surgery, a separate object (None for LoRA)."""
        self.copy = None
        if frozen_copy is not None:
            self.copy = frozen_copy.eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    def place(self, engine) -> "Teacher":
        """Put the frozen copy where the engine keeps models (sharded under ZeRO-3 and FSDP2)."""
        if self.copy is not None:
            self.copy = engine.prepare_frozen(self.copy)
        return self

    @torch.no_grad()
    def logits(self, student_model, input_ids, attention_mask=None) -> torch.Tensor:
        if self.copy is not None:
            return self.copy(input_ids=input_ids, attention_mask=attention_mask).logits
        with _dense_base(student_model):
            return student_model(input_ids=input_ids, attention_mask=attention_mask).logits


@contextlib.contextmanager
def _dense_base(model):
    mlps = sparse_mlps(model)
    saved = [(m.activation, m.sink) for m in mlps]
    dense = SiLU()
    for m in mlps:
        m.activation, m.sink = dense, None
    peft_model = model
    while hasattr(peft_model, "module") and not hasattr(peft_model, "disable_adapter"):
        peft_model = peft_model.module
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        for m, (act, sink) in zip(mlps, saved):
            m.activation, m.sink = act, sink
