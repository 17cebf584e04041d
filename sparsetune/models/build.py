"""Build the model a run trains, evaluates or exports: load -> surgery -> (LoRA)."""

from __future__ import annotations

from pathlib import Path

from sparsetune.checkpoint.activation_state import load_activation_state
from sparsetune.checkpoint.state import is_lora_checkpoint, read_recipe, read_trainer_state
from sparsetune.models.loading import load_model, load_model_and_tokenizer, load_tokenizer
from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.thresholds import apply_saved_thresholds
from sparsetune.surgery.relufy import relufy


def apply_lora(model, recipe: Recipe):
    from peft import LoraConfig, get_peft_model

    cfg = recipe.peft.lora
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        from sparsetune.errors import SparsetuneError

        raise SparsetuneError(f"peft.lora.target_modules: {str(exc).splitlines()[0]}") from None


def model_from_checkpoint(folder: Path, trust_remote_code: bool = False):
    """(model with SparseMLPs (LoRA not merged), tokenizer, recipe, trainer_state) from a checkpoint folder.

    Trust comes from the caller's command line only: `model.trust_remote_code` in the checkpoint's own
    recipe.yaml is ignored (with a notice) unless `trust_remote_code` is given, so loading a checkpoint someone
    sent you never runs code from the hub."""
    recipe = read_recipe(folder)
    if recipe.model.trust_remote_code and not trust_remote_code:
        print(f"sparsetune: {folder}/recipe.yaml sets model.trust_remote_code=true; ignored (pass "
              "--trust-remote-code to allow the model's own code to run)", flush=True)
    if is_lora_checkpoint(folder):
        from peft import PeftModel

        from sparsetune.checkpoint.base_model import check_base_unchanged

        check_base_unchanged(folder, recipe.model.path)  # the adapter is merged into the weights it was trained on

        base, tokenizer = load_model_and_tokenizer(recipe.model.path, recipe.model.dtype, recipe.model.revision,
                                                   trust_remote_code)
        relufy(base, recipe.relufy)
        model = PeftModel.from_pretrained(base, str(folder / "model"))
    else:
        model = load_model(str(folder / "model"), recipe.model.dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(str(folder / "tokenizer"), trust_remote_code=trust_remote_code)
        relufy(model, recipe.relufy)
    load_activation_state(model, folder)  # what calibration computed (CATS thresholds), when the checkpoint has it
    apply_saved_thresholds(model, folder)  # a run that converted to per-layer thresholds (recipe `thresholds`)
    return model, tokenizer, recipe, read_trainer_state(folder)
