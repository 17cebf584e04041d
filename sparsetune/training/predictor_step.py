"""The predictors' part of a training run: build, optimize, measure, checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from sparsetune.checkpoint.state import load_torch_state
from sparsetune.dynamic.evaluate import dynamic_eval
from sparsetune.errors import SparsetuneError
from sparsetune.predictors.bank import PredictorBank, load_predictors
from sparsetune.predictors.hooks import attach_head_hooks
from sparsetune.predictors.metrics import ConfusionCounts
from sparsetune.recipe.schema import Recipe
from sparsetune.surgery.relufy import base_causal_lm


def bank_for(model, recipe: Recipe) -> PredictorBank:
    cfg = base_causal_lm(model).config
    return PredictorBank(recipe.predictor, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                         cfg.num_attention_heads, exact_zeros=recipe.relufy.activation != "silu")


class PredictorTraining:
    def __init__(self, bank: PredictorBank, recipe: Recipe):
        self.bank = bank
        self.recipe = recipe
        self.optimizer = torch.optim.AdamW(bank.parameters(), lr=recipe.predictor.lr, foreach=False)

    @classmethod
    def build(cls, model, recipe: Recipe, recorder, device) -> "PredictorTraining":
        bank = bank_for(model, recipe).to(device)
        fraction = bank.neuron_param_fraction()
        if fraction > recipe.predictor.max_param_fraction:
            raise SparsetuneError(
                f"predictor.rank={recipe.predictor.rank} gives neuron predictors of {fraction:.1%} of the MLP "
                f"parameters, above predictor.max_param_fraction={recipe.predictor.max_param_fraction:g}; "
                "lower the rank or raise the budget")
        recorder.consumers.append(bank)
        if recipe.predictor.heads:
            attach_head_hooks(model, bank, recorder)
        return cls(bank, recipe)

    # ----------------------------------------------------------------- train
    def step(self, accelerator) -> None:
        """Average gradients across ranks (the bank is not wrapped in DDP), then one optimizer step."""
        if accelerator.num_processes > 1:
            for p in self.bank.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        """A step the trainer skipped as non-finite: drop its gradients, change no predictor."""
        self.optimizer.zero_grad(set_to_none=True)

    def _summaries(self, reduce) -> dict:
        out = {}
        for name, counts in (("neurons", self.bank.counts), ("heads", self.bank.head_counts)):
            merged = counts.merge_counts() if counts is not None else None
            if merged is not None:
                out[name] = ConfusionCounts.summary(reduce(merged) if reduce else merged)
        return out

    def pop_counts(self, reduce) -> dict:
        out = self._summaries(reduce)
        self.bank.reset_counts()
        return out

    # ------------------------------------------------------------------ eval
    def begin_eval(self) -> None:
        """Evaluation counts go to fresh counters, and the bank records no loss (eval mode)."""
        self._train_counts = (self.bank.counts, self.bank.head_counts)
        self.bank.reset_counts()
        self.bank.eval()

    def end_eval(self, reduce) -> dict:
        out = self._summaries(reduce)
        self.bank.counts, self.bank.head_counts = self._train_counts
        self.bank.train()
        return out

    def dynamic_eval(self, model, batches, device, all_reduce=None) -> dict:
        was = self.bank.training
        self.bank.eval()
        try:
            return dynamic_eval(model, self.bank, batches, device, exact_zeros=self.bank.exact_zeros,
                                silu_active_fraction=self.recipe.predictor.silu_active_fraction,
                                all_reduce=all_reduce)
        finally:
            self.bank.train(was)

    @staticmethod
    def flat_metrics(prefix: str, pred: dict, dyn: dict | None) -> dict:
        out = {}
        for kind, summary in pred.items():
            for key, value in summary["mean"].items():
                out[f"{prefix}/predictor_{kind}/{key}"] = value
            for i, layer in enumerate(summary["per_layer"]):
                for key in ("recall", "precision", "predicted_sparsity"):
                    out[f"{prefix}/predictor_{kind}_layer/{key}/{i:02d}"] = layer[key]
        for mode, values in (dyn or {}).items():
            out[f"{prefix}/dynamic/{mode}/perplexity"] = values["perplexity"]
            if values.get("sparsity") is not None:
                out[f"{prefix}/dynamic/{mode}/sparsity"] = values["sparsity"]
        return out

    @staticmethod
    def tradeoff_fields(pred: dict, dyn: dict) -> dict:
        mean = pred.get("neurons", {}).get("mean", {})
        return {"predictor_recall": mean.get("recall"), "predictor_precision": mean.get("precision"),
                "predicted_sparsity": mean.get("predicted_sparsity"),
                "perplexity_dense_subset": dyn.get("dense", {}).get("perplexity"),
                "perplexity_oracle": dyn.get("oracle", {}).get("perplexity"),
                "perplexity_predicted": dyn.get("predicted", {}).get("perplexity")}

    # ------------------------------------------------------------ checkpoint
    def save(self, folder: Path, metrics: dict | None) -> None:
        self.bank.save(folder / "predictors", metrics)
        torch.save(self.optimizer.state_dict(), folder / "predictor_optimizer.pt")

    def load(self, folder: Path) -> None:
        saved = load_predictors(folder / "predictors")
        self.bank.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(load_torch_state(folder / "predictor_optimizer.pt"))
