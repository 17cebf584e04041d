"""`sparsetune eval`: perplexity and activation sparsity of a model, run, checkpoint or export, and optionally its
accuracy on lm-evaluation-harness tasks (`downstream.py`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.options import EvalArgs  # the command's typed options (kept light for the CLI)
from sparsetune.evaluation.perplexity import evaluate_held_out, held_out_data
from sparsetune.models.build import SPEC_FILE, SparseModel
from sparsetune.recipe.schema import ACTIVATIONS, RELUFY_VARIANTS, DataSection, relufy_config
from sparsetune.sources.device import resolve_device
from sparsetune.sparsity.cett import TokenSampler, cett_report
from sparsetune.sparsity.compensation import COMPENSATION_BIAS, bias_to_compensation
from sparsetune.sparsity.thresholds import apply_thresholds, fit_thresholds
from sparsetune.surgery.calibration import calibrate, needs_calibration
from sparsetune.surgery.relufy import activation_spec
from sparsetune.surgery.sparse_mlp import patched_mlps, sparse_mlps
from sparsetune.tracking.metrics import layer_metrics, predictor_metrics


@dataclass
class EvalResult:
    """The measurements of one `sparsetune eval`. `held_out` is the perplexity / sparsity summary
    (loss, perplexity, tokens, sparsity, per_layer, near_zero..., cett_sparsity: the CETT-based
    effective sparsity per budget); the others are present when asked for."""

    target: str
    what: str
    activation: dict
    device: str
    data: str
    seq_len: int
    held_out: dict
    calibration: dict | None = None
    dynamic: dict | None = None
    decode: dict | None = None
    predictor_calibration: dict | None = None
    sweep: dict | None = None
    downstream: dict | None = None  # lm-evaluation-harness scores per task (DownstreamRun.to_json())

    def to_json(self) -> dict:
        """eval.json: what was measured and how, the held-out figures at the top level, then the optional parts."""
        out = asdict(self)
        held = out.pop("held_out")
        head = {k: out.pop(k) for k in ("target", "what", "activation", "device", "data", "seq_len")}
        return {**head, **held, **{k: v for k, v in out.items() if v is not None}}

    def to_metrics(self, prefix: str) -> dict:
        """Flat metric names (as a run logs them) for W&B or tables."""
        out = {f"{prefix}/loss": self.held_out["loss"], f"{prefix}/perplexity": self.held_out["perplexity"],
               **layer_metrics(prefix, self.held_out)}
        if self.dynamic:
            out.update(predictor_metrics(prefix, {}, self.dynamic))
        if self.downstream:
            from sparsetune.evaluation.downstream import downstream_metrics

            out.update(downstream_metrics(prefix, self.downstream))
        return out


def load_target(args: EvalArgs) -> SparseModel:
    """The model to measure (models/build.py builds it), with --activation / --target-sparsity swapped in."""
    fitted = [a for a, variant in zip(ACTIVATIONS, RELUFY_VARIANTS) if "target_sparsity" in variant.model_fields]
    if args.target_sparsity is not None and args.activation not in fitted:
        raise SparsetuneError(f"--target-sparsity applies to --activation {' / '.join(fitted)} only")
    swap = None
    if args.activation is not None:
        extra = {"target_sparsity": args.target_sparsity} if args.target_sparsity is not None else {}
        swap = relufy_config(activation=args.activation, **extra).model_dump()
    built = SparseModel.from_source(args.target, trust_remote_code=args.trust_remote_code, activation=swap)
    spec_file = Path(args.target) / SPEC_FILE
    if built.what == "export" and json.loads(spec_file.read_text()).get("compensation_in") == COMPENSATION_BIAS:
        bias_to_compensation(built.model)  # so --no-compensation drops it and --compensate replaces it
    if args.no_compensation:
        for m in sparse_mlps(built.model):
            m.compensation = None
    return built


def run_eval(args: EvalArgs) -> EvalResult:
    dev = resolve_device(args.device)
    tasks = _downstream_tasks(args)  # before the model: a wrong task name or unreachable data fails at once
    prompt = _prompt_masks(args)  # a bad --prompt-* option fails before the model loads
    t = load_target(args)
    model = t.model.to(dev)
    if args.generate and t.predictors is None:
        raise SparsetuneError("--generate needs predictors: evaluate an export or run trained with "
                              "predictor.enabled=true")
    bank = _predictors(t.predictors, args.predictor_threshold) if args.dynamic or args.generate else None
    if bank is not None:
        bank.to(dev).bind(model)
    data_cfg = t.data.model_copy(update={"seq_len": args.seq_len}) if args.seq_len else t.data
    calibration = None
    if needs_calibration(model):  # on the model's own training data, also when --data names other held-out text
        calibration = _calibrate(model, data_cfg, t.tokenizer, args.batch_size, args.calibration_batches, dev)
    if args.compensate:
        from sparsetune.sparsity.compensation import apply_compensation, fit_compensation

        fit = fit_compensation(model, training_batches(data_cfg, t.tokenizer, args.batch_size,
                                                       args.calibration_batches), dev)
        apply_compensation(model, fit.biases)
        calibration = {**(calibration or {}), "compensation_removed_error": fit.removed}
    predictor_calibration = None
    if args.target_recall is not None or args.target_mass_recall is not None:
        if bank is None:
            raise SparsetuneError("--target-recall / --target-mass-recall need --dynamic or --generate and predictors")
        predictor_calibration = _calibrate_predictors(model, bank, data_cfg, t.tokenizer, args, dev)
    data_cfg = with_held_out(data_cfg, args.data)
    data = held_out_data(data_cfg, t.tokenizer)
    cett = TokenSampler()  # a token sample of the same forwards: CETT-based effective sparsity beside exact zeros
    with patched_mlps(model, override=cett.tee):
        held = evaluate_held_out(model, data, args.batch_size, args.batches, args.near_zero_threshold, device=dev)
    held.update(cett_report(cett, sparse_mlps(model)))
    result = EvalResult(target=args.target, what=t.what, activation=activation_spec(model), device=str(dev),
                        data=data_cfg.eval_path or data_cfg.path, seq_len=data_cfg.seq_len, held_out=held,
                        calibration=calibration, predictor_calibration=predictor_calibration)
    if args.dynamic or args.generate:
        result.dynamic = _dynamic(model, data, args.batch_size, args.batches, bank, dev, prompt)
    if args.sweep:
        from sparsetune.data.batches import eval_batches
        from sparsetune.evaluation.sweep import predictor_sweep

        if bank is None:
            raise SparsetuneError("--sweep needs predictors: evaluate an export or run trained with "
                                  "predictor.enabled=true")
        calibration = training_batches(data_cfg, t.tokenizer, args.batch_size, args.calibration_batches)
        result.sweep = predictor_sweep(model, bank, list(eval_batches(data, args.batch_size, args.batches)),
                                       calibration, dev, args.sweep, args.sweep_kind, prompt=prompt)
    if tasks is not None:  # the model as measured above: its activation, calibration and device
        from sparsetune.evaluation.downstream import evaluate_tasks

        result.downstream = evaluate_tasks(model, t.tokenizer, tasks, num_fewshot=args.num_fewshot,
                                           limit=args.limit, batch_size=args.lm_eval_batch_size).to_json()
    if args.generate:  # batch-1 decode kernels are measured on the CPU (the fused kernel is CPU code)
        result.decode = _decode(model.to("cpu"), data, bank.to("cpu"), args.generate, args.prompt_tokens)
    return result


def _downstream_tasks(args: EvalArgs):
    """The lm-eval tasks of --tasks, resolved and with their data loaded (None without --tasks)."""
    if not args.tasks:
        given = [opt for opt, value in (("--include-path", args.include_path), ("--num-fewshot", args.num_fewshot),
                                        ("--limit", args.limit)) if value is not None]
        if given:
            raise SparsetuneError(f"{', '.join(given)} apply with --tasks only")
        return None
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise SparsetuneError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and (args.limit <= 0 or (args.limit >= 1 and args.limit != int(args.limit))):
        raise SparsetuneError(f"--limit must be a whole number of examples or a fraction in (0, 1), got {args.limit:g}")
    if args.lm_eval_batch_size < 1:
        raise SparsetuneError(f"--lm-eval-batch-size must be >= 1, got {args.lm_eval_batch_size}")
    from sparsetune.evaluation.downstream import load_tasks

    return load_tasks(list(args.tasks), args.include_path)


def _predictors(folder, threshold: float | None):
    """The run's / export's predictors (None when it has none), with the --predictor-threshold applied."""
    from sparsetune.predictors.bank import load_predictors

    bank = load_predictors(folder) if folder is not None else None
    if bank is not None and threshold is not None:  # lower = higher recall, fewer neurons skipped
        bank.cfg.threshold = threshold
        bank.layer_thresholds = None  # one global threshold, as asked
    return bank


def _decode(model, data, bank, new_tokens: int, prompt_tokens: int) -> dict:
    import torch

    from sparsetune.dynamic.sparse_decode import decode_benchmark

    prompt = torch.from_numpy(data.ids[0, :prompt_tokens].astype("int64")).view(1, -1)
    return decode_benchmark(model, bank, prompt, new_tokens)


def training_batches(data_cfg, tokenizer, batch_size: int, n: int) -> list[dict]:
    """The first n micro-batches of the training split of `data_cfg` (never the held-out text)."""
    from sparsetune.data.batches import eval_batches
    from sparsetune.data.text_datasets import load_text_splits, pack

    train_text, _ = load_text_splits(data_cfg)
    data = pack(train_text, tokenizer, data_cfg.text_field, data_cfg.seq_len, "calibration data")
    return list(eval_batches(data, batch_size, n))


def _calibrate_predictors(model, bank, data_cfg, tokenizer, args: EvalArgs, device) -> dict:
    """Per-layer predictor thresholds to --target-recall / --target-mass-recall on training micro-batches."""
    from sparsetune.predictors.bank import down_norm_reader
    from sparsetune.predictors.calibration import calibrate_thresholds

    kind = "mass_recall" if args.target_mass_recall is not None else "recall"
    target = args.target_mass_recall if kind == "mass_recall" else args.target_recall
    bank.down_norms = down_norm_reader(sparse_mlps(model))
    batches = training_batches(data_cfg, tokenizer, args.batch_size, args.calibration_batches)
    thresholds = calibrate_thresholds(model, bank, batches, device, target, kind)
    return {"data": f"{data_cfg.path} (training split)", "batches": len(batches), "kind": kind, "target": target,
            "layer_logit_thresholds": thresholds}


def _calibrate(model, data_cfg, tokenizer, batch_size: int, n: int, device) -> dict:
    """The activation's calibrated state (CATS thresholds, output_aware's scales) from the training split of
    `data_cfg` (never the held-out text), then, when its rule is for training only (`unfixed_target`: output_aware's
    per-batch quantile), its fixed thresholds at that target: the model as it would be used."""
    batches = training_batches(data_cfg, tokenizer, batch_size, n)
    thresholds = calibrate(model, batches, device, total=n)
    first = sparse_mlps(model)[0].activation
    target = first.unfixed_target()
    if target is not None:  # training-free: the fixed rule
        fits = fit_thresholds(model, batches, device, first.threshold_form, target, batches_count=len(batches))
        thresholds = [f.threshold for f in fits]
        apply_thresholds(model, first.threshold_form, thresholds)
    return {"data": f"{data_cfg.path} (training split)", "batches": len(batches), "batch_size": batch_size,
            "thresholds": thresholds}


def _dynamic(model, data, batch_size, batches, bank, device, prompt=None) -> dict:
    from sparsetune.data.batches import eval_batches
    from sparsetune.evaluation.dynamic import dynamic_eval
    exact = sparse_mlps(model)[0].activation.exact_zeros
    frac = bank.cfg.silu_active_fraction if bank is not None else 0.3
    return dynamic_eval(model, bank, eval_batches(data, batch_size, batches), device, exact, frac, prompt=prompt)


def _prompt_masks(args: EvalArgs):
    """The prompt-mask mode of --dynamic / --sweep (None with --prompt-fraction 0)."""
    from sparsetune.evaluation.dynamic import PromptMasks

    for option, value in (("--prompt-keep", args.prompt_keep), ("--prompt-mass", args.prompt_mass)):
        if value is not None and not 0 < value <= 1:
            raise SparsetuneError(f"{option} must lie in (0, 1], got {value}")
    if args.prompt_keep is not None and args.prompt_mass is not None:
        raise SparsetuneError("--prompt-keep and --prompt-mass exclude each other")
    if not 0 <= args.prompt_fraction < 1:
        raise SparsetuneError(f"--prompt-fraction must lie in [0, 1) (0: no prompt masks), got {args.prompt_fraction}")
    if args.prompt_fraction == 0:
        return None
    keep = None if args.prompt_mass is not None else (args.prompt_keep or 0.5)
    return PromptMasks(args.prompt_fraction, keep=keep, mass=args.prompt_mass)


def with_held_out(data_cfg: DataSection, data: str | None) -> DataSection:
    """`data_cfg` with its held-out text replaced by `data` (--data): a local file is held out whole, a hub
    dataset gives its validation/test split. Unchanged when `data` is None."""
    if not data:
        return data_cfg
    from sparsetune.data.text_datasets import _looks_local

    update = ({"eval_path": data, "eval_split": None} if _looks_local(data)
              else {"path": data, "eval_path": None, "eval_split": None})
    return data_cfg.model_copy(update=update)


def write_json(result: EvalResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
