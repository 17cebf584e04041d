"""`powerinfer`: the Hugging Face folder (plain where transformers computes the model exactly, else with code) plus
`model.powerinfer.gguf`, which PowerInfer runs sparse as it is: a ReLU Llama with predictors trained with
`predictor.output_bias: false` and `predictor.input: residual` (export/powerinfer.py maps them, export/
powerinfer_gguf.py writes the file), its rows hot-first by activation count, and `activation/` (the neuron counts
its GPU/CPU split solver reads). What PowerInfer computes is this target's knowledge: relu(gate) * up on the
neurons its predictors keep (asked of the activation's per-neuron math), a llama/mistral model without biases."""

from __future__ import annotations

from pathlib import Path

from sparsetune.errors import SparsetuneError
from sparsetune.export.powerinfer import hot_first_order, neuron_activation_counts, powerinfer_layers
from sparsetune.export.powerinfer_gguf import (
    GGUF_FILE,
    NEURON_ORDER_FILE,
    check_activation,
    check_model,
    tensor_bytes,
    write_activation_counts,
    write_gguf,
    write_neuron_order,
)
from sparsetune.export.targets.base import ExportJob, ExportTarget, HFForm
from sparsetune.export.targets.hf_code import express_auto, write_code_target
from sparsetune.surgery.structure import decoder_layers


def _refusal(job: ExportJob) -> str | None:
    if job.bank is None:
        return "--powerinfer needs predictors: export a run trained with predictor.enabled=true"
    try:
        check_activation(job.spec, [m.activation for m in job.mlps])
        check_model(job.lm.config)
        powerinfer_layers(job.bank, _norms(job))  # the predictors' own refusals
    except SparsetuneError as exc:
        return str(exc)
    return None


def _norms(job: ExportJob) -> list:
    return [layer.post_attention_layernorm.weight for layer in decoder_layers(job.lm)]


class PowerInfer(ExportTarget):
    name = "powerinfer"
    help = ("also write DIR/model.powerinfer.gguf, which PowerInfer runs sparse as it is (a ReLU Llama with "
            "predictors trained with predictor.output_bias=false and predictor.input=residual), and DIR/activation/ "
            "(neuron counts for its GPU/CPU split); see docs/ENGINES.md")
    files = (GGUF_FILE, NEURON_ORDER_FILE, "activation/")

    def refusal(self, job: ExportJob) -> str | None:
        return _refusal(job)

    def measure(self, job: ExportJob) -> None:
        bank = job.bank
        self.threshold, self.fc_layers = powerinfer_layers(bank, _norms(job))
        self.counts, self.count_tokens = neuron_activation_counts(job.model.to(job.device),
                                                                  job.batches(bank.cfg.calibration_batches),
                                                                  job.device)
        self.neuron_order = hot_first_order(self.counts)  # the GGUF's rows hot-first; HF weights keep theirs
        self.tensor_bytes = None

    def express(self, job: ExportJob) -> HFForm:
        return express_auto(job)

    def write(self, job: ExportJob, folder: Path, form: HFForm) -> None:
        if form.code:
            write_code_target(folder, form.load_spec, job.layout)
        gguf = write_gguf(job.lm, job.tokenizer, self.fc_layers, self.threshold, folder / GGUF_FILE,
                          name=f"sparsetune {job.name}", neuron_order=self.neuron_order)
        self.tensor_bytes = tensor_bytes(gguf)  # predictor bytes beside the MLP's
        write_activation_counts(self.counts, folder, self.neuron_order)  # in the GGUF's row order, as PowerInfer reads
        write_neuron_order(self.neuron_order, folder)  # file row r holds the model's neuron order[r]

    def report(self, job: ExportJob) -> dict:
        bank, state = job.bank, job.state
        entry = {"file": GGUF_FILE, "sparse_threshold": self.threshold, "predictor_input": bank.cfg.input,
                 "activation_counts": {"folder": "activation", "tokens": self.count_tokens, "order": "file rows"},
                 "neuron_order": f"hot-first by activation count on {self.count_tokens} calibration tokens",
                 "neuron_order_file": NEURON_ORDER_FILE}
        if self.tensor_bytes is not None:
            entry["tensor_bytes"] = self.tensor_bytes
        return {"powerinfer": entry, "predictors": {
            "files": ["predictors.safetensors", "predictors.json"],
            **{k: v for k, v in bank.spec().items() if k != "config"}, "config": bank.cfg.model_dump(mode="json"),
            "evaluation": {k: state.get("last_eval", {}).get(k) for k in ("predictor", "dynamic")}}}

    def card_rows(self, job: ExportJob, form: HFForm, used: bool) -> list[str]:
        if used:
            return ["| PowerInfer | yes, sparse: `model.powerinfer.gguf` with the predictors, as it is: "
                    "`./build/bin/main -m model.powerinfer.gguf -p TEXT` (CPU, tested; `activation/` holds the neuron "
                    "counts its GPU/CPU split solver reads, GPU mode not run). Measured on SmolLM2-135M from "
                    "`recipes/powerinfer.yaml`: 1.14x its own all-neurons decode, perplexity within 0.1% of "
                    "sparsetune's (docs/ENGINES.md) |"]
        try:
            check_activation(job.spec, [m.activation for m in job.mlps])
        except SparsetuneError:
            return [f"| PowerInfer | no: its llama path computes relu(gate) * up on the neurons its predictors keep, "
                    f"not `{job.spec['activation']}` |"]
        return ["| PowerInfer | ReLU models with predictors: export with `--target powerinfer` (predictors trained "
                "with `predictor.output_bias: false`, `predictor.input: residual`) |"]


TARGET = PowerInfer
