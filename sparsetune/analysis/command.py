"""`sparsetune analyze MODEL`: load the model as `eval` does, collect one dense pass, run every analysis, write the
report. Reads top to bottom in pipeline order."""

from __future__ import annotations

import time
from pathlib import Path

from sparsetune.analysis.collect import Collection, collect
from sparsetune.analysis.heads import layer_heads
from sparsetune.analysis.history import different_token_pairs, layer_history, same_token_pairs
from sparsetune.analysis.inertia import DISTANCES, layer_inertia, random_pairs
from sparsetune.analysis.options import AnalyzeArgs  # the command's typed options (kept light for the CLI)
from sparsetune.analysis.prompt_overlap import KEPT_FRACTIONS, layer_prompt_overlap
from sparsetune.analysis.sparsity import CETT_BUDGETS, active_definition, active_mask, cett_key, layer_sparsity
from sparsetune.errors import SparsetuneError

HEADLINE_KEEP = 0.5  # the prompt coverage shown per layer: at eval's default prompt-mask kept fraction


def out_dir(args: AnalyzeArgs) -> Path:
    """The report folder, checked before anything is computed: --out, else MODEL/analysis when MODEL is a run or
    an export sparsetune made (never a folder of the user's)."""
    from sparsetune.checkpoint.folders import check_output_folder, made_by_sparsetune

    if args.out:
        return check_output_folder(Path(args.out), "--out")
    if made_by_sparsetune(Path(args.target)):
        return check_output_folder(Path(args.target) / "analysis", "report folder")
    raise SparsetuneError(f"analyze {args.target}: pass --out DIR (the report goes into MODEL/analysis only when "
                          "MODEL is a run or export sparsetune made)")


def _check(args: AnalyzeArgs) -> None:
    if args.batches < 1 or args.batch_size < 1:
        raise SparsetuneError("--batches and --batch-size must be >= 1")
    if not 0 < args.prompt_fraction < 1:
        raise SparsetuneError(f"--prompt-fraction must lie in (0, 1), got {args.prompt_fraction}")
    if args.cett_tokens < 1:
        raise SparsetuneError(f"--cett-tokens must be >= 1, got {args.cett_tokens}")


def load_batches(args: AnalyzeArgs):
    """(model on its device, device, what was loaded, data path, held-out batches): the model and held-out text
    exactly as `sparsetune eval` picks them."""
    from sparsetune.data.batches import eval_batches
    from sparsetune.evaluation.command import with_held_out
    from sparsetune.evaluation.perplexity import held_out_data
    from sparsetune.models.build import SparseModel
    from sparsetune.sources.device import resolve_device
    from sparsetune.surgery.calibration import needs_calibration

    dev = resolve_device(args.device)
    t = SparseModel.from_source(args.target, trust_remote_code=args.trust_remote_code,
                                activation={"activation": args.activation} if args.activation else None)
    if needs_calibration(t.model):
        raise SparsetuneError("analyze does not calibrate CATS thresholds; analyze a model whose activation needs "
                              "no calibration (or measure CATS with `sparsetune eval --activation cats`)")
    data_cfg = t.data.model_copy(update={"seq_len": args.seq_len}) if args.seq_len else t.data
    data_cfg = with_held_out(data_cfg, args.data)
    data = held_out_data(data_cfg, t.tokenizer)
    batches = list(eval_batches(data, args.batch_size, args.batches))
    if not batches:
        raise SparsetuneError(f"analyze: the held-out text of {data_cfg.path} holds no {data_cfg.seq_len}-token row")
    return t.model.to(dev).eval(), dev, t.what, data_cfg.path, batches


def analyze(collection: Collection, prompt_fraction: float = 0.5, cett_tokens: int = 256,
            near_zero_threshold: float = 1e-3, seed: int = 0) -> dict:
    """Every analysis of one collection, per layer and as means over layers (JSON-ready)."""
    ids = collection.token_ids
    pairs = random_pairs(tuple(ids.shape), 4096, seed)
    same = same_token_pairs(ids, seed=seed)
    different = different_token_pairs(ids, max(same[0].numel(), 256), seed + 1)
    layers, by_distance, coverage = [], [], {"count": [], "mass": []}
    uniform_heads = None
    for layer in range(collection.num_layers):
        sp = layer_sparsity(collection, layer, near_zero_threshold, cett_tokens, seed=seed)
        active = active_mask(collection, layer, sp.active_threshold)
        inertia = layer_inertia(active, pairs)
        history = layer_history(active, same, different)
        overlap = layer_prompt_overlap(collection.activations[layer], collection.down_norms(layer), active,
                                       prompt_fraction)
        heads = layer_heads(collection.head_norms[layer]) if collection.head_norms is not None else {}
        uniform_heads = heads.get("uniform_top_quarter")
        layers.append({
            "layer": layer, "exact_zero": sp.exact_zero, "near_zero": sp.near_zero,
            **{cett_key(b): sp.cett[b] for b in CETT_BUDGETS}, "active_fraction": sp.active_fraction,
            "active_threshold": sp.active_threshold,
            "inertia_consecutive": inertia["consecutive"], "inertia_random": inertia["random"],
            "same_token": history["same_token"], "history_dependence": history["history_dependence"],
            "token_explained": history["token_explained"],
            f"prompt_count@{HEADLINE_KEEP:g}": overlap["count"][HEADLINE_KEEP],
            f"prompt_mass@{HEADLINE_KEEP:g}": overlap["mass"][HEADLINE_KEEP],
            "head_top_quarter_share": heads.get("top_quarter_share"), "heads_for_90pct": heads.get("heads_for_90pct"),
        })
        by_distance.append([inertia["by_distance"].get(d) for d in DISTANCES])
        for kind in coverage:
            coverage[kind].append([overlap[kind][k] for k in KEPT_FRACTIONS])
    distances = [d for i, d in enumerate(DISTANCES) if any(row[i] is not None for row in by_distance)]
    return {
        "active_definition": active_definition(collection), "exact_zeros": collection.exact_zeros,
        "activation": collection.activation, "perplexity": collection.perplexity,
        "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": int(ids.numel()),
        "prompt_fraction": prompt_fraction, "cett_tokens": cett_tokens, "near_zero_threshold": near_zero_threshold,
        "pairs": {"random": int(pairs[0].numel()) if pairs is not None else 0, "same_token": int(same[0].numel()),
                  "different_token": int(different[0].numel())},
        "means": layer_means(layers),
        "layers": layers,
        "inertia_by_distance": {"distances": distances, "jaccard": [row[: len(distances)] for row in by_distance]},
        "prompt_overlap": {"kept_fractions": list(KEPT_FRACTIONS), **coverage},
        "heads": {"uniform_top_quarter": uniform_heads},
    }


def layer_means(layers: list[dict]) -> dict:
    """The mean over layers of every per-layer figure (layers where it is undefined left out; None if all are)."""
    out = {}
    for key in layers[0]:
        if key in ("layer", "active_threshold"):
            continue
        values = [row[key] for row in layers if row[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def run_analysis(args: AnalyzeArgs) -> tuple[dict, list[Path]]:
    """Measure, write the report into the output folder, log it to W&B when asked; (result, files written)."""
    from sparsetune.analysis.report import log_wandb, write_report

    _check(args)
    out = out_dir(args)
    start = time.perf_counter()
    model, dev, what, data_path, batches = load_batches(args)
    collection = collect(model, batches, dev)
    del model
    result = {"target": args.target, "what": what, "device": str(dev), "data": data_path,
              **analyze(collection, args.prompt_fraction, args.cett_tokens, args.near_zero_threshold, args.seed)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    files = write_report(result, out)
    if args.wandb:
        log_wandb(result, files, out, args.wandb, args.wandb_project)
    return result, files
