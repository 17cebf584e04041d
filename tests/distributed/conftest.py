"""The multi-process runs, each launched once per session and asserted on by every test that needs it.

A launch costs tens of seconds on CPU (two interpreters importing torch, a gloo group, DeepSpeed's set-up), so each
sharding engine (FSDP2, ZeRO-3) gets one full fine-tune carrying every feature it must place (FULL: teacher, MLP
distillation, predictors), stopped at step 2 and resumed, and one LoRA run likewise. The DDP run of FULL is the
reference of FULL's (it is itself held to one process of twice the micro-batch); one process of the global batch is
the reference of the LoRA and frozen-model runs. The plain recipe's DDP run is compared with one process of
twice the micro-batch, and is the reference of DDP's exact resume and of ZeRO-2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.distributed.launching import (
    COMMON,
    FROZEN,
    FULL,
    LORA,
    Launched,
    export_run,
    launched,
    stop_and_resume,
    two_machines,
)
from tests.e2e_helpers import train_tiny


class SharedRuns:
    """Every run made once, on first use; a run that failed fails every test that asks for it, at once."""

    def __init__(self, model: Path, tmp_path_factory):
        self.model = model
        self._tmp = tmp_path_factory
        self._made: dict[str, Launched | Exception] = {}

    def _once(self, name: str, make: Callable[[Path], Launched]) -> Launched:
        if name not in self._made:
            try:
                self._made[name] = make(self._tmp.mktemp(name) / "run")
            except Exception as exc:  # an assertion of the launch itself
                self._made[name] = exc
        made = self._made[name]
        if isinstance(made, Exception):
            raise made
        return made

    def _launch(self, name: str, preset: str, *extra: str) -> Launched:
        return self._once(name, lambda run: Launched(run, launched(self.model, run, preset, *extra).stdout))

    def _resumed(self, name: str, preset: str, *extra: str) -> Launched:
        def make(run: Path) -> Launched:
            first, second = stop_and_resume(self.model, run, preset, *extra)
            return Launched(run, first + second, first)

        return self._once(name, make)

    def _single(self, name: str, *extra: str) -> Launched:
        def make(run: Path) -> Launched:
            assert train_tiny(self.model, run, *COMMON, "train.micro_batch_size=8", "wandb.mode=disabled", *extra) == 0
            return Launched(run, "")

        return self._once(name, make)

    # --- the plain recipe: DDP against one process, its exact resume, ZeRO-2, gradient accumulation -------------
    def single_plain(self) -> Launched:
        """One process, micro-batch 8: the rows both DDP ranks see together (evaluation: half the batch count)."""
        return self._single("single_plain")

    def ddp_plain(self) -> Launched:
        return self._launch("ddp_plain", "ddp")

    def resumed_plain(self, preset: str) -> Launched:
        return self._resumed(f"{preset}_plain", preset)

    def two_machines_accumulating(self) -> Launched:
        """2 machines over loopback x 1 process, micro-batch 2 x 2 accumulation steps: the global batch of 8."""
        return self._once("two_machines", lambda run: two_machines(self.model, run, "train.micro_batch_size=2",
                                                                    "train.grad_accum_steps=2"))

    # --- full fine-tunes with FULL's features -------------------------------------------------------------------
    def single_full(self) -> Launched:
        return self._single("single_full", *FULL, "predictor.dynamic_eval_batches=1")

    def ddp_full(self) -> Launched:
        """2-process DDP, uninterrupted: the reference of the sharding engines' runs of FULL."""
        return self._launch("ddp_full", "ddp", *FULL, "wandb.mode=offline")  # test_memory_metrics reads its W&B run

    def resumed_full(self, preset: str) -> Launched:
        """`preset`'s run of FULL, stopped at step 2 and resumed."""
        return self._resumed(f"{preset}_full", preset, *FULL)

    def export(self, which: Launched) -> Path:
        return self._once(f"export_{which.run.parent.name}",
                          lambda out: Launched(export_run(which.run, out), "")).run

    # --- a short FSDP2 run on a held-out set too short for every rank ------------------------------------------------
    def fsdp_uneven_held_out(self) -> Launched:
        """2 steps under FSDP2 on a text file whose held-out set gives the two ranks different batch counts (what
        hung); train.txt and held.txt lie beside the run folder."""

        def make(run: Path) -> Launched:
            from transformers import AutoTokenizer

            from sparsetune.data.batches import eval_batch_counts
            from sparsetune.data.text_datasets import load_text_splits, pack
            from sparsetune.recipe.schema import DataSection

            text, held = run.parent / "train.txt", run.parent / "held.txt"
            paragraphs = [f"Paragraph {i} talks about sparse activations, predictors and checkpoints." * 6
                          for i in range(300)]
            text.write_text("\n\n".join(paragraphs))
            tokenizer = AutoTokenizer.from_pretrained(self.model)
            for k in range(1, 8):  # the fewest paragraphs that give the two ranks different batch counts
                held.write_text("\n\n".join(paragraphs[:k]))
                _, held_text = load_text_splits(DataSection(path=str(text), eval_path=str(held), seq_len=64))
                counts = eval_batch_counts(len(pack(held_text, tokenizer, "text", 64, "held-out")), 4, 4, 2)
                if counts[0] != counts[1]:
                    break
            assert counts[0] != counts[1], counts
            proc = launched(self.model, run, "fsdp", f"data.path={text}", f"data.eval_path={held}", "train.max_steps=2")
            return Launched(run, proc.stdout)

        return self._once("fsdp_uneven", make)

    # --- LoRA and the frozen model: one process of the global batch is the reference ------------------------------
    def single_lora(self) -> Launched:
        return self._single("single_lora", *LORA, "predictor.dynamic_eval_batches=1")

    def resumed_lora(self, preset: str) -> Launched:
        return self._resumed(f"{preset}_lora", preset, *LORA)

    def single_frozen(self) -> Launched:
        return self._single("single_frozen", *FROZEN, "predictor.dynamic_eval_batches=1")


@pytest.fixture(scope="session")
def runs(tiny_model_dirs, tmp_path_factory) -> SharedRuns:
    return SharedRuns(tiny_model_dirs["llama"], tmp_path_factory)
