"""LoRA adapters (peft) on a surgery'd model, as the recipe's `peft` section asks."""

from __future__ import annotations

from sparsetune.errors import SparsetuneError


def with_peft(model, peft):
    """`model` with LoRA adapters when `peft.method` is lora (only they train), else `model` itself. `peft`: the
    recipe's PeftSection."""
    if peft.method != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    cfg = peft.lora
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise SparsetuneError(f"peft.lora.target_modules: {str(exc).splitlines()[0]}") from None
