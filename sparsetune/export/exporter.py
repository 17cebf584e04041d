"""`sparsetune export`: a checkpoint -> a Hugging Face folder (plain, or with its own code) + sparsity report + model
card, plus what the chosen export target writes (export/targets/: one file per target)."""

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
from sparsetune.console import notice
from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.command import training_batches
from sparsetune.evaluation.perplexity import evaluate_held_out, held_out_data
from sparsetune.export.model_card import model_card
from sparsetune.export.targets import ExportJob, choose_target, get_target, target_names
from sparsetune.models.build import SPEC_FILE, SparseModel
from sparsetune.predictors.bank import load_predictors
from sparsetune.recipe.loading import recipe_to_yaml
from sparsetune.sources.device import resolve_device
from sparsetune.sparsity.compensation import COMPENSATION_BIAS
from sparsetune.sparsity.thresholds import read_conversion
from sparsetune.surgery.relufy import activation_spec, restore_hf_mlps
from sparsetune.surgery.structure import base_causal_lm
from sparsetune.training.completion import refuse_unfinished


def export(run_or_checkpoint: str | Path, out: str | Path, measure: bool = True, eval_batches_n: int | None = None,
           overwrite: bool = False, device: str = "auto", trust_remote_code: bool = False,
           target: str | None = None) -> Path:
    """Write the newest usable checkpoint of a run (or one checkpoint folder) at `out` for export target `target`
    (a name from export/targets; None: a plain HF folder when plain transformers computes the model, else one with
    its own code).
    `out` is written into a temporary folder and moved into place whole; an existing `out` is replaced only
    when it is a sparsetune export holding nothing the export did not write."""
    if target is not None and target not in target_names():
        raise SparsetuneError(f"--target {target!r} is not an export target; choose one of {', '.join(target_names())}")
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
        return _export(ckpt, out, measure, eval_batches_n, dev, trust_remote_code, target)
    finally:
        lock.release()


def _notice(message: str) -> None:
    notice(message)


def _export(ckpt: Path, out: Path, measure: bool, eval_batches_n: int | None, dev, trust_remote_code: bool,
            target_name: str | None) -> Path:
    built = SparseModel.from_source(ckpt, trust_remote_code=trust_remote_code)  # LoRA merged
    model, tokenizer, recipe, state = built.model, built.tokenizer, built.recipe, built.trainer_state
    model.eval()
    lm = base_causal_lm(model)
    job = ExportJob(model=model, lm=lm, spec=activation_spec(lm), tokenizer=tokenizer, recipe=recipe, state=state,
                    bank=load_predictors(built.predictors) if built.predictors is not None else None, device=dev,
                    name=out.name, batches=lambda n: training_batches(recipe.data, tokenizer,
                                                                      recipe.train.micro_batch_size, n))
    target = choose_target(target_name, job)
    why = target.refusal(job)  # refused in one line before anything is measured or written
    if why is not None:
        raise SparsetuneError(why)
    report_eval = (evaluate_held_out(model.to(dev), held_out_data(recipe.data, tokenizer),
                                     recipe.train.micro_batch_size, eval_batches_n or recipe.train.eval_batches,
                                     recipe.sparsity.near_zero_threshold, device=dev)
                   if measure else state.get("last_eval", {}))
    target.measure(job)
    model.to("cpu")

    form = target.express(job)  # the HF folder's config and weights; the model's SparseMLPs still compute
    rows = [row for name in target_names()
            for row in get_target(name).card_rows(job, form, name == target.name)]
    restore_hf_mlps(lm)
    for attr in ("quantization_config",):
        if hasattr(lm.config, attr):
            delattr(lm.config, attr)

    report = {
        "activation": job.spec, "plain_transformers_exact": form.exact,
        "load_with": "AutoModelForCausalLM" if form.exact else "AutoModelForCausalLM, trust_remote_code=True",
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
    texts = {"recipe.yaml": recipe_to_yaml(recipe), "README.md": model_card(recipe, report, form, rows)}
    spec = {"activation": job.spec, "load_activation": form.load_spec, "plain_transformers_exact": form.exact,
            "source_checkpoint": str(ckpt.resolve()), "step": state.get("step"), "model_type": lm.config.model_type}
    spec["target"] = target.name
    if form.in_bias:  # eval --no-compensation / --compensate move it out (sparsity/compensation.bias_to_compensation)
        spec["compensation_in"] = COMPENSATION_BIAS

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if lm.generation_config is not None:
            lm.generation_config.save_pretrained(tmp)
        if job.bank is not None:
            job.bank.save(tmp, metrics=state.get("last_eval", {}).get("predictor"))
        target.write(job, tmp, form)
        report.update(target.report(job))
        texts["sparsity_report.json"] = json.dumps(report, indent=1)
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

