"""AdamW + cosine LR schedule with linear warmup, and putting the recipe's values back after a resume."""

from __future__ import annotations

import torch
from transformers import get_cosine_schedule_with_warmup

from sparsetune.recipe.schema import TrainSection


def build_optimizer(params, cfg: TrainSection, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (weight decay on matrices only).

    `fused`: torch's fused AdamW, which updates in place. The default per-tensor path computes its denominator out of
    place (two temporaries the size of the tensor it steps); DeepSpeed ZeRO hands the optimizer each rank's partition
    as ONE flat tensor, so there those temporaries are twice the rank's whole partition (+1.0 GiB measured on a
    0.5 GiB tensor, 0 fused: scripts/bench_sharding_memory.py's ZeRO excess)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # "decay" marks the group that takes train.weight_decay (kept in the optimizer's state_dict, read on resume)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    # foreach=False (and fused, per tensor too) keeps the update bitwise identical whatever the parameter grouping
    # (exact resume).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=False, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainSection):
    return get_cosine_schedule_with_warmup(optimizer, cfg.lr_warmup_steps, cfg.max_steps)


def apply_recipe_after_restore(scheduler, cfg: TrainSection) -> None:
    """After a resume restored the optimizer and LR-scheduler state (which carry the old run's LR, weight decay and
    betas), make the recipe's values the ones used: each group's base LR is train.lr, its weight decay and betas
    the recipe's, and the LR of the next step is the schedule of this recipe (its max_steps and warmup) at the
    restored step. For an unchanged recipe this recomputes exactly the values that were restored."""
    optimizer = scheduler.optimizer
    for group in optimizer.param_groups:
        decay = group.get("decay", group.get("weight_decay", 0.0) > 0)
        group["weight_decay"] = cfg.weight_decay if decay else 0.0
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["initial_lr"] = cfg.lr
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports for the next step (torch keeps it there)
