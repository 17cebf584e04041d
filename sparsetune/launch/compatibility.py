"""Recipe x launch checks: combinations that cannot work fail before any process starts training."""

from __future__ import annotations

from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import Recipe


def check_launch(recipe: Recipe, strategy: str, shards_parameters: bool, num_processes: int, where: str) -> None:
    """Raise SparsetuneError naming the recipe key when `recipe` cannot run under this strategy. `where` starts the
    message: the preset before launching (`--launch zero3`), the engine inside a process (`DeepSpeed ZeRO-3`)."""
    if not shards_parameters:
        return
    # every forward is collective when parameters are sharded: each rank must run the same number of them
    counts = [("train.eval_batches", recipe.train.eval_batches)]
    if recipe.predictor.enabled:
        counts.append(("predictor.dynamic_eval_batches", recipe.predictor.dynamic_eval_batches))
    for key, n in counts:
        if n % num_processes:
            raise SparsetuneError(
                f"{where}: {key}={n} must be a multiple of the {num_processes} processes (every rank runs the same "
                "number of sharded forwards)")
    if recipe.thresholds.cett is not None:
        raise SparsetuneError(
            f"{where}: thresholds.cett={recipe.thresholds.cett:g} fits each layer's threshold on its full "
            "down-projection outside the forward, which is sharded under this preset; use thresholds.target_sparsity "
            "(fitted on the gate alone), or launch with --launch ddp or zero2")
    if recipe.compensation.enabled:
        raise SparsetuneError(
            f"{where}: compensation.enabled fits each layer's bias on its full down-projection outside the forward, "
            "which is sharded under this preset; launch with --launch ddp or zero2")
