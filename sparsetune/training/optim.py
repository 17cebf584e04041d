"""AdamW + cosine LR schedule with linear warmup."""

from __future__ import annotations

import torch
from transformers import get_cosine_schedule_with_warmup

from sparsetune.recipe.schema import TrainSection


def build_optimizer(params, cfg: TrainSection) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps the update bitwise identical whatever the parameter grouping (exact resume).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=False)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainSection):
    return get_cosine_schedule_with_warmup(optimizer, cfg.lr_warmup_steps, cfg.max_steps)
