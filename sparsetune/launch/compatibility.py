"""Recipe x launch checks: combinations that cannot work fail before any process starts training."""

from __future__ import annotations

from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import Recipe


def check_launch(recipe: Recipe, strategy: str, shards_parameters: bool, num_processes: int, where: str) -> None:
    """Raise SparsetuneError naming the recipe key when `recipe` cannot run under this strategy. `where` starts the
    message: the preset before launching (`--launch zero3`), the engine inside a process (`DeepSpeed ZeRO-3`)."""
    if strategy in ("fsdp", "deepspeed"):
        if recipe.peft.method != "none":
            raise SparsetuneError(
                f"{where}: peft.method={recipe.peft.method} is not supported with {strategy} in sparsetune; LoRA "
                "adapters are small, launch with --launch ddp (or train the full model)")
        if recipe.train.freeze_model:
            raise SparsetuneError(
                f"{where}: train.freeze_model=true trains only the predictors; launch with --launch ddp")
    if shards_parameters:
        if recipe.distill.mlp_weight > 0:
            raise SparsetuneError(
                f"{where}: distill.mlp_weight={recipe.distill.mlp_weight:g} computes each layer's dense MLP from the "
                "weight tensors, which are sharded under this preset; set distill.mlp_weight=0 or launch with --launch "
                "ddp or zero2")
        if recipe.predictor.enabled and recipe.predictor.dynamic_eval_batches > 0:
            raise SparsetuneError(
                f"{where}: predictor.dynamic_eval_batches={recipe.predictor.dynamic_eval_batches} computes MLPs from "
                "the weight tensors, which are sharded under this preset; set predictor.dynamic_eval_batches=0 and "
                "run `sparsetune eval EXPORT --dynamic` on the export")
        if recipe.train.eval_batches % num_processes:
            raise SparsetuneError(
                f"{where}: train.eval_batches={recipe.train.eval_batches} must be a multiple of the "
                f"{num_processes} processes (every rank runs the same number of sharded forwards)")

