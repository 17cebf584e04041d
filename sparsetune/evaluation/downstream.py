"""Downstream accuracy through lm-evaluation-harness (`sparsetune eval --tasks`).

The harness gets the model object sparsetune loaded, SparseMLPs included, not a path to reload: activations that
plain transformers cannot express (drelu, topk, fatrelu, cats with its calibrated thresholds, ...) are scored as
sparsetune runs them. Tasks are resolved and their data loaded before the model is, so a misspelled task or a hub
task without internet fails in one line before any measuring starts.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from sparsetune.errors import SparsetuneError

INSTALL_HINT = "pip install lm-eval"
_COUNTS = ("examples", "task_examples", "num_fewshot")  # the per-task entries that are not scores

# What the harness logs about how sparsetune calls it (an already-loaded model, a task loading its own data), not
# about anything the user can change.
_NOISE = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type", "Passed an already-initialized model"),
    "lm_eval.api.task": ("Custom kwargs can be passed",),
}


@dataclass
class DownstreamTasks:
    """Tasks resolved and loaded by the harness, ready to evaluate once."""

    names: list[str]  # as the user gave them
    include_path: str | None
    task_manager: object  # lm_eval.tasks.TaskManager
    top_level: list  # the harness's Task / Group objects, in the order asked


@dataclass
class DownstreamRun:
    """The harness's scores: `tasks` = {task or group: {metric: value, metric_stderr: value, examples, ...}},
    JSON-ready; `samples` = the harness's per-example records (prompts, per-choice log-likelihoods), not saved."""

    harness: str
    num_fewshot: int | None
    limit: int | float | None
    batch_size: int
    include_path: str | None
    tasks: dict[str, dict]
    samples: dict[str, list] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {"harness": self.harness, "num_fewshot": self.num_fewshot, "limit": self.limit,
                "batch_size": self.batch_size, "include_path": self.include_path, "tasks": self.tasks}


def harness_version() -> str:
    try:
        return f"lm-eval {metadata.version('lm_eval')}"
    except metadata.PackageNotFoundError:
        return "lm-eval"


def _import_harness():
    try:
        import lm_eval.evaluator  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise SparsetuneError(f"--tasks needs lm-evaluation-harness, which is not installed ({exc}): "
                              f"{INSTALL_HINT}") from None
    return TaskManager


def load_tasks(names: list[str], include_path: str | None = None) -> DownstreamTasks:
    """Resolve task names (the harness's names, glob patterns like `arc_*`, or .yaml files), with the tasks of
    `include_path` added, and load their data. One-line SparsetuneError for anything the user must fix."""
    if not names:
        raise SparsetuneError("--tasks: no task named (e.g. --tasks arc_easy,hellaswag)")
    if include_path is not None and not Path(include_path).is_dir():
        raise SparsetuneError(f"--include-path: no such folder: {include_path} (a folder of lm-eval task YAML files)")
    task_manager_cls = _import_harness()
    _quiet_harness()
    manager = task_manager_cls(include_path=include_path)
    specs = []
    for name in names:
        if name.endswith(".yaml"):
            if not Path(name).is_file():
                raise SparsetuneError(f"--tasks: task file not found: {name}")
            specs.append(str(Path(name).resolve()))
        elif manager.match_tasks([name]):
            specs.extend(s for s in manager.match_tasks([name]) if s not in specs)
        else:
            raise SparsetuneError(_unknown_task(name, manager.all_tasks, include_path))
    top_level = []
    for spec in specs:
        try:
            loaded = manager.load([spec])
        except Exception as exc:  # the task's YAML, its Python or its data: all the user's to fix
            raise SparsetuneError(_load_failure(spec, exc)) from None
        top_level.extend(_top_level(loaded))
    return DownstreamTasks(list(names), include_path, manager, top_level)


def _unknown_task(name: str, known: list[str], include_path: str | None) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    where = f"the harness's tasks nor in --include-path {include_path}" if include_path else "the harness's tasks"
    return (f"--tasks: unknown lm-eval task {name!r}{hint}: not among {where}; a local task needs "
            f"--include-path DIR (a folder of task YAML files); the harness's own tasks (arc_easy, hellaswag, ...) "
            f"download their data from the Hugging Face hub and need internet")


def _load_failure(spec: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = f"--tasks: lm-eval could not load task {spec!r}: {type(exc).__name__}: {first}"
    if isinstance(exc, ConnectionError) or "offline" in first.lower() or "hub" in first.lower():
        message += ("; the harness's own tasks download their data from the Hugging Face hub and need internet "
                    "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset), or evaluate a local task with --include-path DIR")
    return message


def _top_level(loaded: dict) -> list:
    """The Groups and Tasks of one TaskManager.load() that no loaded Group contains (what was asked for)."""
    groups = loaded.get("groups") or {}
    children = {c for names in (loaded.get("group_map") or {}).values() for c in names}
    in_groups = {t.task_name for g in groups.values() for t in g.get_all_tasks()}
    return ([g for name, g in groups.items() if name not in children]
            + [t for name, t in loaded["tasks"].items() if name not in in_groups])


def evaluate_tasks(model, tokenizer, tasks: DownstreamTasks, *, num_fewshot: int | None = None,
                   limit: int | float | None = None, batch_size: int = 8) -> DownstreamRun:
    """Score `model` (as it is: activation, calibration, device) on the loaded tasks with the harness."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    try:
        out = simple_evaluate(lm, tasks=tasks.top_level, task_manager=tasks.task_manager, num_fewshot=num_fewshot,
                              limit=limit, log_samples=True)
    finally:
        model.train(was_training)
    return DownstreamRun(harness=harness_version(), num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                         include_path=tasks.include_path, tasks=_scores(out), samples=out.get("samples") or {})


def _scores(out: dict) -> dict[str, dict]:
    """{task: {acc: .., acc_stderr: .., acc_norm: .., ..., examples, task_examples, num_fewshot}} from the harness:
    its "metric,filter" keys lose the default filter's ",none"; a stderr it could not compute ("N/A") is None."""
    scores = {}
    for name, values in out["results"].items():
        row = {}
        for key, value in values.items():
            if "," not in key:  # alias, name, sample_len
                continue
            metric, _, filt = key.partition(",")
            metric = metric if filt == "none" else f"{metric},{filt}"
            row[metric] = value if isinstance(value, int | float) else None
        n = (out.get("n-samples") or {}).get(name)
        if n is not None:  # effective < original under --limit
            row["examples"], row["task_examples"] = n["effective"], n["original"]
        if name in (out.get("n-shot") or {}):
            row["num_fewshot"] = out["n-shot"][name]
        scores[name] = row
    return scores


def downstream_metrics(prefix: str, downstream: dict) -> dict:
    """Flat metric names: {prefix}/downstream/{task}/{metric}."""
    return {f"{prefix}/downstream/{task}/{metric}": value for task, row in downstream["tasks"].items()
            for metric, value in row.items() if value is not None and metric not in _COUNTS}


class _DropNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(p in message for p in self.prefixes)


def _quiet_harness() -> None:
    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(prefixes))
