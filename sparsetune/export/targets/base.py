"""What an export target is (the protocol of `export/targets/`): one file per target, each knowing what its
engine or file format can express and refusing, in one line, what it cannot.

The exporter (export/exporter.py) builds the model once, hands every target the same `ExportJob` and calls, in
order:

  refusal(job)        why it cannot write this model (one line), or None; asked before anything is measured
  measure(job)        what it reads off the sparse model on the device (PowerInfer: per-neuron activation counts)
  express(job)        the Hugging Face folder's form: the config and weights plain transformers computes with, what
                      sparsetune applies on load (`HFForm`); every export holds the HF weights folder
  write(job, folder, form)   its own files, after the HF folder, tokenizer and predictors are in `folder`
  report(job)         its entries of sparsity_report.json
  card_rows(job, form, used)  its rows of the model card's engines table (`used`: it is the export's target)

A target asks the activation for its math (`MLPActivation.computes`, `gate_shift`, `elementwise`, `spec`) and
decides itself; no activation says anything about a target. Adding a target is one module here defining
`TARGET` (or `targets.register(cls)` for one defined elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sparsetune.surgery.architectures import MLPLayout, layout_for
from sparsetune.surgery.sparse_mlp import SparseMLP, sparse_mlps


@dataclass
class ExportJob:
    """The model being exported and what came with it (built once by the exporter)."""

    model: object  # the built model (LoRA merged)
    lm: object  # its transformers CausalLM (`base_causal_lm`, looked up once)
    spec: dict  # the trained activation with every layer's state (`activation_spec`, looked up once)
    tokenizer: object
    recipe: object
    state: dict  # the checkpoint's trainer state
    bank: object | None  # the co-trained predictors, or None
    device: object
    name: str  # the export folder's name
    batches: Callable[[int], list[dict]]  # the first n training micro-batches of the run's data

    @property
    def layout(self) -> MLPLayout:
        return layout_for(self.lm.config.model_type)

    @property
    def mlps(self) -> list[SparseMLP]:
        return sparse_mlps(self.lm)


@dataclass
class HFForm:
    """How the exported Hugging Face folder computes the trained model."""

    exact: bool  # plain transformers (no remote code) computes it exactly
    load_spec: dict  # the activation sparsetune applies on load (sparsetune.json's load_activation)
    note: str  # the model card's activation paragraph
    in_bias: bool = False  # the compensation is the down projection's bias
    code: bool = False  # the folder has its own model_type and modeling code
    hidden_act: str | None = None  # config.hidden_act when `exact`


class ExportTarget:
    """One export target; every hook but `express` has a do-nothing default."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""  # one line: `sparsetune export --target`'s help
    files: ClassVar[tuple[str, ...]] = ()  # what it writes beside the HF folder (for the docs)

    def refusal(self, job: ExportJob) -> str | None:
        return None

    def measure(self, job: ExportJob) -> None:
        pass

    def express(self, job: ExportJob) -> HFForm:
        raise NotImplementedError

    def write(self, job: ExportJob, folder: Path, form: HFForm) -> None:
        pass

    def report(self, job: ExportJob) -> dict:
        return {}

    def card_rows(self, job: ExportJob, form: HFForm, used: bool) -> list[str]:
        return []
