"""`sparsetune eval`: perplexity and activation sparsity of a model, run, checkpoint or export."""

from __future__ import annotations

import json
from pathlib import Path

from sparsetune.checkpoint.store import MARKER, resolve_checkpoint
from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.perplexity import evaluate_held_out, held_out_data
from sparsetune.models.build import model_from_checkpoint
from sparsetune.models.device import resolve_device
from sparsetune.models.exported import activation_for_hf_config, load_activation_spec
from sparsetune.models.loading import load_model, load_model_and_tokenizer, load_tokenizer
from sparsetune.recipe.schema import DataSection, RelufySection
from sparsetune.surgery.calibration import needs_calibration
from sparsetune.models.structure import sparse_mlps
from sparsetune.surgery.relufy import activation_spec, relufy


def _load_target(target: str, activation: str | None, target_sparsity: float | None = None,
                 trust_remote_code: bool = False):
    """(model with SparseMLPs, tokenizer, default data section, description, predictors folder or None).
    Remote code runs only when the caller passes `trust_remote_code` (the command line), never because a
    checkpoint's or export's own recipe asks for it."""
    path = Path(target)
    is_run = path.is_dir() and ((path / "checkpoints").is_dir() or (path / MARKER).is_file())
    predictors = None
    if is_run:
        ckpt = resolve_checkpoint(path)
        predictors = ckpt / "predictors" if (ckpt / "predictors" / "predictors.json").is_file() else None
        model, tokenizer, recipe, state = model_from_checkpoint(ckpt, trust_remote_code=trust_remote_code)
        if recipe.peft.method == "lora":
            model = model.merge_and_unload()
        data, what = recipe.data, f"checkpoint at step {state.get('step')}"
    else:
        if path.is_dir() and (path / "config.json").is_file():
            model = load_model(str(path), trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
            spec = load_activation_spec(path, model.config)
        else:
            model, tokenizer = load_model_and_tokenizer(target, trust_remote_code=trust_remote_code)
            spec = activation_for_hf_config(model.config)
        relufy(model, spec)
        if path.is_dir() and (path / "predictors.json").is_file():
            predictors = path
        # An export carries its recipe: evaluate on the same held-out data it was trained against.
        recipe_file = path / "recipe.yaml" if path.is_dir() else None
        if recipe_file is not None and recipe_file.is_file():
            from sparsetune.recipe.loading import read_yaml, validate_recipe

            data, what = validate_recipe(read_yaml(recipe_file), str(recipe_file)).data, "export"
        else:
            data, what = DataSection(), "model"
    if activation is not None:
        extra = {"target_sparsity": target_sparsity} if target_sparsity is not None else {}
        relufy(model, RelufySection(activation=activation, **extra))
    return model, tokenizer, data, what, predictors


def run_eval(target: str, data_path: str | None = None, seq_len: int | None = None, batches: int = 16,
             batch_size: int = 4, activation: str | None = None, near_zero_threshold: float = 1e-3,
             dynamic: bool = False, predictor_threshold: float | None = None, target_sparsity: float | None = None,
             calibration_batches: int = 8, generate: int = 0, prompt_tokens: int = 32, device: str = "auto",
             trust_remote_code: bool = False) -> dict:
    dev = resolve_device(device)
    model, tokenizer, data_cfg, what, predictors = _load_target(target, activation, target_sparsity,
                                                                trust_remote_code)
    model.to(dev)
    if generate and predictors is None:
        raise SparsetuneError("--generate needs predictors: evaluate an export or run trained with predictor.enabled=true")
    bank = _predictors(predictors, predictor_threshold) if dynamic or generate else None
    if bank is not None:
        bank.to(dev)
    if seq_len:
        data_cfg = data_cfg.model_copy(update={"seq_len": seq_len})
    calibration = None
    if needs_calibration(model):  # on the model's own training data, also when --data names other held-out text
        calibration = _calibrate(model, data_cfg, tokenizer, batch_size, calibration_batches, dev)
    if data_path:  # a local file is held out whole; a hub dataset gives its validation/test split
        from sparsetune.data.text_datasets import _looks_local

        update = ({"eval_path": data_path, "eval_split": None} if _looks_local(data_path)
                  else {"path": data_path, "eval_path": None, "eval_split": None})
        data_cfg = data_cfg.model_copy(update=update)
    data = held_out_data(data_cfg, tokenizer)
    result = evaluate_held_out(model, data, batch_size, batches, near_zero_threshold, device=dev)
    out = {"target": target, "what": what, "activation": activation_spec(model), "device": str(dev),
           "data": data_cfg.path, "seq_len": data_cfg.seq_len, **result}
    if calibration is not None:
        out["calibration"] = calibration
    if dynamic or generate:
        out["dynamic"] = _dynamic(model, data, batch_size, batches, bank, dev)
    if generate:  # batch-1 decode kernels are measured on the CPU (the fused kernel is CPU code)
        out["decode"] = _decode(model.to("cpu"), data, bank.to("cpu"), generate, prompt_tokens)
    return out


def _predictors(folder, threshold: float | None):
    """The run's / export's predictors (None when it has none), with the --predictor-threshold applied."""
    from sparsetune.predictors.bank import load_predictors

    bank = load_predictors(folder) if folder is not None else None
    if bank is not None and threshold is not None:  # lower = higher recall, fewer neurons skipped
        bank.cfg.threshold = threshold
    return bank


def _decode(model, data, bank, new_tokens: int, prompt_tokens: int) -> dict:
    import torch

    from sparsetune.dynamic.sparse_decode import decode_benchmark

    prompt = torch.from_numpy(data.ids[0, :prompt_tokens].astype("int64")).view(1, -1)
    return decode_benchmark(model, bank, prompt, new_tokens)


def _calibrate(model, data_cfg, tokenizer, batch_size: int, n: int, device) -> dict:
    """CATS thresholds from the training split of `data_cfg` (never the held-out text)."""
    from sparsetune.data.batches import eval_batches
    from sparsetune.data.text_datasets import load_text_splits, pack
    from sparsetune.surgery.calibration import calibrate_cats

    train_text, _ = load_text_splits(data_cfg)
    data = pack(train_text, tokenizer, data_cfg.text_field, data_cfg.seq_len, "calibration data")
    thresholds = calibrate_cats(model, eval_batches(data, batch_size, n), device, total=n)
    return {"data": f"{data_cfg.path} (training split)", "batches": n, "batch_size": batch_size,
            "thresholds": thresholds}


def _dynamic(model, data, batch_size, batches, bank, device) -> dict:
    from sparsetune.data.batches import eval_batches
    from sparsetune.evaluation.dynamic import dynamic_eval
    exact = sparse_mlps(model)[0].activation.exact_zeros
    frac = bank.cfg.silu_active_fraction if bank is not None else 0.3
    return dynamic_eval(model, bank, eval_batches(data, batch_size, batches), device, exact, frac)


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"{result['target']} ({result['what']}, activation {result['activation']['activation']})")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("held-out perplexity", f"{result['perplexity']:.3f}")
    summary.add_row("tokens evaluated", str(result["tokens"]))
    summary.add_row("activation sparsity (exact zeros)", f"{result.get('sparsity', 0):.2%}")
    if "near_zero" in result:
        summary.add_row(f"near-zero activations (|a| <= {result['near_zero_threshold']:g})", f"{result['near_zero']:.2%}")
    console.print(summary)
    layers = Table(title="per-layer activation sparsity")
    layers.add_column("layer", justify="right")
    layers.add_column("exact zeros", justify="right")
    if "near_zero" in result:
        layers.add_column("near-zero", justify="right")
    for i, v in enumerate(result.get("per_layer", [])):
        row = [str(i), f"{v:.2%}"]
        if "near_zero" in result:
            row.append(f"{result['near_zero_per_layer'][i]:.2%}")
        layers.add_row(*row)
    console.print(layers)
    if "dynamic" in result:
        dyn = Table(title="dynamic activation: perplexity when skipping for real")
        for col in ("mode", "perplexity", "skipped (sparsity)"):
            dyn.add_column(col, justify="right" if col != "mode" else "left")
        for mode, values in result["dynamic"].items():
            sp = values.get("sparsity")
            dyn.add_row(mode, f"{values['perplexity']:.3f}", "-" if sp is None else f"{sp:.2%}")
        console.print(dyn)
        if "decode" in result:
            d = result["decode"]
            dec = Table(title=f"sparse decode: {d['new_tokens']} greedy tokens after a {d['prompt_tokens']}-token "
                              f"prompt, batch 1, {d['threads']} threads")
            for col in ("MLPs", "tokens/s", "MLP ms/token", "MLP share of time", "neurons computed"):
                dec.add_column(col, justify="right" if col != "MLPs" else "left")
            for mode in ("dense", "sparse"):
                m = d[mode]
                kept = f"{m['neurons_kept']:.1%}" if "neurons_kept" in m else "100%"
                dec.add_row(mode if mode == "dense" else "predicted (sparse kernel)", f"{m['tokens_per_s']:.2f}",
                            f"{m['mlp_ms_per_token']:.2f}", f"{m['mlp_share']:.0%}", kept)
            console.print(dec)
            console.print(f"speedup {d['speedup']:.2f}x end to end, {d['mlp_speedup']:.2f}x on the MLPs; "
                          f"{d['greedy_tokens_matching_dense']:.0%} of greedy tokens equal to dense; perplexity "
                          f"{result['dynamic']['dense']['perplexity']:.2f} dense -> "
                          f"{result['dynamic'].get('predicted', {}).get('perplexity', float('nan')):.2f} predicted")
        if "predicted" not in result["dynamic"]:
            console.print("no predictors found (train with predictor.enabled=true): dense and oracle modes only")


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
