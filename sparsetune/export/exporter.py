"""`sparsetune export`: a checkpoint -> a plain Hugging Face folder + sparsity report + model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sparsetune.checkpoint.folders import (
    check_export_target,
    clean_export_debris,
    replace_folder,
    resolve_link,
)
from sparsetune.checkpoint.locks import export_lock
from sparsetune.checkpoint.storage import first_line, storage_failure
from sparsetune.checkpoint.store import resolve_checkpoint
from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.perplexity import evaluate_held_out, held_out_data
from sparsetune.export.hf_code import CODE_FILE, write_code_target
from sparsetune.export.model_card import model_card
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
from sparsetune.models.build import SPEC_FILE, SparseModel
from sparsetune.predictors.bank import load_predictors
from sparsetune.recipe.loading import recipe_to_yaml
from sparsetune.sources.device import resolve_device
from sparsetune.sparsity.compensation import COMPENSATION_BIAS
from sparsetune.sparsity.thresholds import read_conversion
from sparsetune.surgery.architectures import layout_for
from sparsetune.surgery.relufy import activation_spec, restore_hf_mlps
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.surgery.structure import base_causal_lm, decoder_layers
from sparsetune.training.completion import refuse_unfinished


def configure_plain_activation(lm, spec: dict) -> tuple[bool, dict, str]:
    """Set config (and weights) so plain transformers computes the trained activation where it can; the activation
    plugin says how (`hf_hidden_act`, or `export_plain`) and what transformers computes otherwise.

    Returns (exact_in_plain_transformers, activation to apply when loading with sparsetune, note).
    """
    mlps = sparse_mlps(lm)
    act = mlps[0].activation
    if act.hf_hidden_act is not None:
        lm.config.hidden_act = act.hf_hidden_act
        return True, spec, (f"`config.hidden_act = {act.hf_hidden_act!r}`: plain transformers computes the trained "
                            "activation.")
    folded = act.export_plain(lm, mlps, layout_for(lm.config.model_type))
    if folded is not None:
        load_spec, note = folded
        return True, load_spec, note
    name, closest = spec["activation"], act.plain_fallback
    lm.config.hidden_act = closest
    per_layer = (f" Its {len(spec['thresholds'])} per-layer thresholds are in `sparsetune.json` "
                 "(`load_activation.thresholds`)." if spec.get("thresholds") else "")
    return False, spec, (
        f"**Plain transformers cannot express `{name}`** for model type `{lm.config.model_type}` (no `hidden_act` "
        f"computes it; `{closest}` would run the model without its zeros). Load it with "
        f"`sparsetune.load_sparse_model(path)` (or `sparsetune eval path`), or with transformers' remote code as below."
        f"{per_layer}")


def fold_compensation(lm, load_spec: dict) -> tuple[bool, dict, str]:
    """Put the compensation biases (when the model has them) where plain transformers computes them: the down
    projection's bias of an MLP class that has one (`config.mlp_bias`: llama and kin; gate / up get zero biases),
    else they stay in sparsetune.json's load_activation. Returns (exact in plain transformers, load spec, note)."""
    mlps = sparse_mlps(lm)
    if "compensation" not in load_spec:
        return True, load_spec, ""
    import torch

    biased = lm.config.to_dict().get("mlp_bias") is not None
    if biased:
        lm.config.mlp_bias = True
        with torch.device("meta"):
            probe = mlps[0].original_class(lm.config)
        biased = all(getattr(probe, n).bias is not None for n in mlps[0].layout_names)
        if not biased:
            lm.config.mlp_bias = False
    if not biased:
        return False, load_spec, (f"The dropped-activation compensation biases are in `sparsetune.json` "
                                  f"(`load_activation.compensation`): `{lm.config.model_type}`'s MLP has no "
                                  "down-projection bias to hold them.")
    for m in mlps:
        for name, proj in zip(m.layout_names, m.projections()):
            value = m.compensation if name == m.layout_names[2] else torch.zeros(proj.out_features)
            proj.bias = torch.nn.Parameter(value.detach().to(proj.weight.dtype).clone())
        m.compensation = None
    rest = {k: v for k, v in load_spec.items() if k != "compensation"}
    return True, rest, ("The dropped-activation compensation is the down projection's bias (`config.mlp_bias = "
                        "true`; gate and up biases are zero), added after the trained activation's zeros.")


def export(run_or_checkpoint: str | Path, out: str | Path, measure: bool = True, eval_batches_n: int | None = None,
           overwrite: bool = False, device: str = "auto", trust_remote_code: bool = False,
           powerinfer: bool = False) -> Path:
    """Write the newest usable checkpoint of a run (or one checkpoint folder) as a plain HF folder at `out`.
    `out` is written into a temporary folder and moved into place whole; an existing `out` is replaced only
    when it is a sparsetune export holding nothing the export did not write."""
    if eval_batches_n is not None and eval_batches_n < 1:
        raise SparsetuneError(f"--eval-batches must be a positive number of batches, got {eval_batches_n}")
    # judged by what it is: `.` is the working folder, a symlink its target
    out = Path(os.path.abspath(resolve_link(Path(out), "--out", _notice)))  # resolve_link also checks the name
    ckpt = resolve_checkpoint(Path(run_or_checkpoint))
    refuse_unfinished(ckpt, "export")
    check_export_target(out, ckpt, overwrite)
    dev = resolve_device(device)
    lock = export_lock(out)  # one export at a time into `out`; held until it is in place
    try:
        lock.acquire(f"sparsetune export {run_or_checkpoint} --out {out}")
    except OSError as exc:
        raise SparsetuneError(f"cannot write the export {out}: {storage_failure(exc) or exc}") from None
    try:
        clean_export_debris(out, _notice)
        check_export_target(out, ckpt, overwrite)  # again, under the lock: another export may just have finished
        return _export(ckpt, out, measure, eval_batches_n, dev, trust_remote_code, powerinfer)
    finally:
        lock.release()


def _notice(message: str) -> None:
    print(f"sparsetune: {message}", flush=True)


def _export(ckpt: Path, out: Path, measure: bool, eval_batches_n: int | None, dev, trust_remote_code: bool,
            powerinfer: bool) -> Path:
    built = SparseModel.from_source(ckpt, trust_remote_code=trust_remote_code)  # LoRA merged
    model, tokenizer, recipe, state = built.model, built.tokenizer, built.recipe, built.trainer_state
    model.eval()
    report_eval = (evaluate_held_out(model.to(dev), held_out_data(recipe.data, tokenizer),
                                     recipe.train.micro_batch_size, eval_batches_n or recipe.train.eval_batches,
                                     recipe.sparsity.near_zero_threshold, device=dev)
                   if measure else state.get("last_eval", {}))
    bank = load_predictors(built.predictors) if built.predictors is not None else None
    counts = None
    if powerinfer:  # refused in one line before anything is measured or written
        if bank is None:
            raise SparsetuneError("--powerinfer needs predictors: export a run trained with predictor.enabled=true")
        check_activation(activation_spec(base_causal_lm(model)))
        check_model(base_causal_lm(model).config)
        norms = [layer.post_attention_layernorm.weight for layer in decoder_layers(base_causal_lm(model))]
        threshold, fc_layers = powerinfer_layers(bank, norms)
        from sparsetune.evaluation.command import training_batches

        counts, count_tokens = neuron_activation_counts(model.to(dev), training_batches(
            recipe.data, tokenizer, recipe.train.micro_batch_size, bank.cfg.calibration_batches), dev)
        neuron_order = hot_first_order(counts)  # the GGUF's rows hot-first; HF weights and predictors keep theirs
    model.to("cpu")

    lm = base_causal_lm(model)
    trained_spec = activation_spec(lm)
    exact, load_spec, note = configure_plain_activation(lm, trained_spec)
    compensated = "compensation" in load_spec
    folded, load_spec, comp_note = fold_compensation(lm, load_spec)
    in_bias = compensated and "compensation" not in load_spec
    exact, note = exact and folded, f"{note} {comp_note}".strip()
    layout = layout_for(lm.config.model_type)
    if not exact:  # its own model_type and code: computed exactly with trust_remote_code, refused without it
        note = (f"{note} The folder therefore has its own `model_type` (`sparsetune_{lm.config.model_type}`) and "
                f"modeling code (`{CODE_FILE}`): `AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)` "
                "computes the trained model exactly (per-layer values in config.json's `sparsetune_activation`); "
                "without `trust_remote_code` transformers refuses to load it instead of running the dense model.")
    restore_hf_mlps(lm)
    for attr in ("quantization_config",):
        if hasattr(lm.config, attr):
            delattr(lm.config, attr)

    report = {
        "activation": trained_spec, "plain_transformers_exact": exact,
        "load_with": "AutoModelForCausalLM" if exact else "AutoModelForCausalLM, trust_remote_code=True",
        "step": state.get("step"),
        "tokens_seen": state.get("tokens_seen"),
        "evaluation": {k: report_eval.get(k) for k in ("perplexity", "loss", "tokens", "sparsity", "per_layer",
                                                        "near_zero", "near_zero_per_layer", "near_zero_threshold")
                       if k in report_eval},
        "evaluated_on": ("held-out split of the recipe's data" if measure
                         else f"last evaluation (step {report_eval.get('step')})"),
        "recipe": recipe.model_dump(mode="json"),
    }
    conversion, _ = read_conversion(ckpt)
    if conversion is not None:  # the run converted to per-layer thresholds (already on the model and in its spec)
        report["thresholds"] = conversion.to_json()
    if powerinfer:
        report["powerinfer"] = {"file": GGUF_FILE, "sparse_threshold": threshold,
                                "predictor_input": bank.cfg.input, "activation_counts": {
                                    "folder": "activation", "tokens": count_tokens, "order": "file rows"},
                                "neuron_order": f"hot-first by activation count on {count_tokens} calibration tokens",
                                "neuron_order_file": NEURON_ORDER_FILE}
        report["predictors"] = {"files": ["predictors.safetensors", "predictors.json"], **{
            k: v for k, v in bank.spec().items() if k != "config"}, "config": bank.cfg.model_dump(mode="json"),
            "evaluation": {k: state.get("last_eval", {}).get(k) for k in ("predictor", "dynamic")}}
    texts = {"sparsity_report.json": json.dumps(report, indent=1), "recipe.yaml": recipe_to_yaml(recipe),
             "README.md": model_card(recipe, report, note, exact, powerinfer)}
    spec = {"activation": trained_spec, "load_activation": load_spec, "plain_transformers_exact": exact,
            "source_checkpoint": str(ckpt.resolve()), "step": state.get("step"), "model_type": lm.config.model_type}
    if in_bias:  # eval --no-compensation / --compensate move it back out (sparsity/compensation.bias_to_compensation)
        spec["compensation_in"] = COMPENSATION_BIAS

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lm.save_pretrained(tmp)
        if not exact:
            write_code_target(tmp, load_spec, layout)
        tokenizer.save_pretrained(tmp)
        if lm.generation_config is not None:
            lm.generation_config.save_pretrained(tmp)
        if bank is not None:
            bank.save(tmp, metrics=state.get("last_eval", {}).get("predictor"))
        if powerinfer:
            gguf = write_gguf(lm, tokenizer, fc_layers, threshold, tmp / GGUF_FILE, name=f"sparsetune {out.name}",
                              neuron_order=neuron_order)
            report["powerinfer"]["tensor_bytes"] = tensor_bytes(gguf)  # predictor bytes beside the MLP's
            texts["sparsity_report.json"] = json.dumps(report, indent=1)
            write_activation_counts(counts, tmp, neuron_order)  # in the GGUF's row order, as PowerInfer reads them
            write_neuron_order(neuron_order, tmp)  # file row r holds the model's neuron order[r]
        for name, text in texts.items():
            (tmp / name).write_text(text)
        # Written last: the marker of a finished export, listing what it wrote (what --overwrite may replace later).
        spec["files"] = sorted(p.name for p in tmp.iterdir())
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=1))
        replace_folder(tmp, out)
    except Exception as exc:  # noqa: BLE001 - a full disk is OSError, RuntimeError (torch), SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        storage = storage_failure(exc, tmp)
        if storage is None and not isinstance(exc, OSError):
            raise
        raise SparsetuneError(f"could not write the export {out}: {storage or first_line(exc)}; nothing was "
                              "replaced (the unfinished copy was removed)") from None
    return out
