"""The training run: setup -> (eval) -> steps -> eval / checkpoint -> final eval, plot, checkpoint.

Read top to bottom: `Trainer.run()` is the whole program. The model is built by the one builder
(`models/build.py`: load, surgery with its stored state and calibration, LoRA); the features of a run (sparsity
regularization, distillation, co-trained predictors, threshold conversion) are components with one protocol
(`training/components/`); how the model is distributed is an engine chosen once (`training/engines.py`), and the
predictor-only steps are a phase run by the FrozenModel engine (`training/phases.py`). None of them appears as a
branch here.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from sparsetune.checkpoint.activation_state import save_activation_state
from sparsetune.checkpoint.base_model import run_base_fingerprint, write_base_fingerprint
from sparsetune.checkpoint.folders import RUN_MARKER, clear_run, inspect_run_folder, mark_run, resolve_link
from sparsetune.checkpoint.locks import FolderLock, run_lock
from sparsetune.checkpoint.parts import CheckpointPart
from sparsetune.checkpoint.resume import check_process_count, check_recipe, plan_output_dir
from sparsetune.checkpoint.state import (
    load_torch_state,
    read_rng_state,
    read_trainer_state,
    rng_state,
    set_rng_state,
    write_json,
)
from sparsetune.checkpoint.storage import storage_failure
from sparsetune.checkpoint.store import CheckpointStore, write_atomic
from sparsetune.data.batches import BatchStream, eval_batch_counts, eval_batches, padding_batch
from sparsetune.data.fingerprint import FILE as DATA_FINGERPRINT
from sparsetune.data.fingerprint import data_change, data_fingerprint
from sparsetune.data.text_datasets import load_text_splits, pack
from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.perplexity import evaluate
from sparsetune.launch.compatibility import check_launch
from sparsetune.models.build import SparseModel
from sparsetune.recipe.loading import recipe_to_yaml
from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.recorder import attach_recorder
from sparsetune.tracking.files import TRADEOFF_COLUMNS, MetricFiles
from sparsetune.tracking.metrics import layer_metrics
from sparsetune.tracking.plots import plot_tradeoff
from sparsetune.tracking.wandb_run import WandbRun
from sparsetune.training.checkpointing import Checkpointer
from sparsetune.training.components import build_components, judge_resume
from sparsetune.training.components.base import Component, EvalContext, Setup, StepContext
from sparsetune.training.engines import Engine
from sparsetune.training.optim import apply_recipe_after_restore
from sparsetune.training.phases import Phases
from sparsetune.training.preemption import PreemptionGuard
from sparsetune.training.progress import TrainingProgress


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class Trainer:
    """One run of a recipe. `resume`: None/False = new run; True = newest usable checkpoint in output_dir (a fresh
    start when the folder is new or empty); a path = that checkpoint folder."""

    def __init__(self, recipe: Recipe, overwrite: bool = False, resume: bool | str | None = None,
                 command: str = "sparsetune train RECIPE", allow_data_change: bool = False):
        self.recipe = recipe
        self.allow_data_change = allow_data_change  # resume on rows other than the checkpoint's (a notice, no stop)
        self.data_fingerprint: dict | None = None  # which rows the run trains and evaluates on (checkpoint part)
        self.run_dir = Path(recipe.output_dir)
        self.overwrite = overwrite
        self.resume = resume
        self.command = command
        self.progress = TrainingProgress()
        self.resume_from: Path | None = None
        self.clear_run_dir = False
        self.recipe_changes: list[str] = []  # what a resume changed (recorded in recipe-history.jsonl)
        # what this process made, and only that, is removed when setup fails (main process)
        self.lock: FolderLock | None = None
        self.created_dirs: list[Path] = []
        self.written: list[Path] = []
        self.base_fingerprint: dict | None = None  # LoRA: the base model's files by sha256 (checkpoint part)
        # built by setup()
        self.accelerator: Accelerator | None = None
        self.engine: Engine | None = None  # the training engine; each step runs on its phase's (self.phases)
        self.phases: Phases | None = None
        self.engine_in_use: Engine | None = None  # the engine of the phase the last step ran in
        self.device: torch.device | None = None
        self.is_main = True
        self.tokenizer = None
        self.train_data = self.eval_data = None
        self.components: list[Component] = []
        self.recorder = None
        self.model = self.optimizer = self.scheduler = None
        self.stream: BatchStream | None = None
        self.store = CheckpointStore(self.run_dir)
        self.files = MetricFiles(self.run_dir)
        self.wandb: WandbRun | None = None

    @staticmethod
    def notice(message: str) -> None:
        print(f"sparsetune: {message}", flush=True)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        # a file there, a NUL byte or an over-long name: one line before any process group
        inspect_run_folder(resolve_link(self.run_dir, "output_dir"))
        self._setup_distributed()
        self._plan_output_dir()
        set_seed(self.recipe.train.seed)
        model = self._setup_model_and_data()
        self._check_data()
        self._setup_components(model)
        self.stream = BatchStream(self.train_data, self.recipe.train.micro_batch_size, self.recipe.train.seed,
                                  self.accelerator.process_index, self.accelerator.num_processes)
        if self.resume_from is not None:
            self._restore(self.resume_from)

    def _setup_distributed(self) -> None:
        r = self.recipe
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(r.train.mixed_precision))
        self.engine = Engine.create(self.accelerator, r)
        self.phases = Phases(r, self.engine)
        self.engine_in_use = self.engine
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        check_launch(r, Engine.strategy_of(self.accelerator), self.engine.shards_parameters,
                     self.accelerator.num_processes, self.engine.describe())

    def _plan_output_dir(self) -> None:
        """The main process decides how output_dir is used (and verifies the checkpoint it resumes from, once);
        every rank gets the same decision, or the same one-line error."""
        r = self.recipe
        decision: list = [None]
        if self.is_main:
            try:
                self._claim_run_dir()
                plan = plan_output_dir(self.run_dir, self.resume, self.overwrite, report=self.notice)
                self.base_fingerprint = run_base_fingerprint(r, plan.resume_from)
                if plan.resume_from is not None:
                    self.recipe_changes = check_recipe(plan.resume_from, r, report=self.notice, judge=judge_resume)
                    check_process_count(plan.resume_from, self.accelerator.num_processes,
                                        self.engine.saves_optimizer_itself())
                elif plan.restart and (self.run_dir / "recipe.yaml").is_file():
                    self.recipe_changes = check_recipe(self.run_dir, r, report=self.notice, judge=judge_resume)
                decision[0] = ("ok", plan, r.relufy.model_dump(), str(self.run_dir))
            except SparsetuneError as exc:
                decision[0] = ("error", str(exc), None, None)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision)
        status, plan, relufy, run_dir = decision[0]
        if status == "error":
            raise SparsetuneError(plan)
        self._use_run_dir(Path(run_dir))
        self.resume_from, self.clear_run_dir = plan.resume_from, plan.clear
        r.relufy = relufy  # as check_recipe left it on the main process (an old checkpoint's CATS thresholds)

    def _use_run_dir(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.store = CheckpointStore(run_dir)
        self.files = MetricFiles(run_dir)

    def _claim_run_dir(self) -> None:
        """Main process: make output_dir (what it creates is recorded, and only that is removed if setup fails)
        and take its lock for the whole run, before anything reads or writes in it. A symlinked output_dir is
        its target."""
        run_dir = resolve_link(self.run_dir, "output_dir", self.notice)
        self._use_run_dir(run_dir)
        inspect_run_folder(run_dir)
        missing = [d for d in [run_dir, *run_dir.parents] if not d.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()  # atomic: succeeds for exactly one process, so "this process made it" is true
                self.created_dirs.append(folder)
        except FileExistsError:
            pass  # another process made it first: it is not ours
        except OSError as exc:
            raise SparsetuneError(f"cannot create output_dir {run_dir}: {storage_failure(exc) or exc}") from None
        try:
            self.lock = run_lock(run_dir).acquire(self.command)
        except OSError as exc:
            self._undo_claim()
            raise SparsetuneError(f"cannot write into output_dir {run_dir}: {storage_failure(exc) or exc}") from None
        except SparsetuneError:
            self._undo_claim()
            raise

    def _undo_claim(self) -> None:
        """Setup failed or was stopped before the run started: remove the files this process wrote and the
        folders it made, if they are empty now; nothing else (a file someone put there meanwhile stays)."""
        if not self.is_main:
            return
        for path in reversed(self.written):
            path.unlink(missing_ok=True)
        self.written.clear()
        if self.lock is not None:
            self.lock.release(remove=self.lock.created_file)
            self.lock = None
        for folder in reversed(self.created_dirs):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        self.created_dirs.clear()

    def _load_model(self) -> SparseModel:
        r = self.recipe
        return SparseModel.load(r.model.path, r.model.dtype, r.model.revision, r.model.trust_remote_code)

    def _setup_model_and_data(self) -> SparseModel:
        r = self.recipe
        model = self._load_model()
        self.tokenizer = model.tokenizer
        train_text, eval_text = load_text_splits(r.data)
        with self.accelerator.main_process_first():
            self.train_data = pack(train_text, self.tokenizer, r.data.text_field, r.data.seq_len, "data.path")
            self.eval_data = pack(eval_text, self.tokenizer, r.data.text_field, r.data.seq_len, "held-out data")
        return model

    def _check_data(self) -> None:
        """Fingerprint the rows this run trains and evaluates on (every checkpoint records it). A resume on other rows
        than its checkpoint's stops with one line before anything is written, unless --allow-data-change (then a
        notice, and recipe-history.jsonl records it); a checkpoint from before fingerprints gets a notice."""
        self.data_fingerprint = data_fingerprint(self.recipe.data, self.train_data, self.eval_data)
        if self.resume_from is None:
            return
        path = self.resume_from / DATA_FINGERPRINT
        if not path.is_file():
            if self.is_main:
                self.notice(f"resume: {self.resume_from} records no data fingerprint (written by an older "
                            "sparsetune); the data could not be checked")
            return
        found = data_change(json.loads(path.read_text()), self.data_fingerprint)
        if found is None:
            return
        change, effect = found
        if not self.allow_data_change:
            raise SparsetuneError(f"{change}; resume would {effect}; pass --allow-data-change to continue on the new "
                                  "data")
        if self.is_main:
            step = read_trainer_state(self.resume_from).get("step", 0)
            self.notice(f"resume: {change}; --allow-data-change: from step {step + 1} on the run will {effect}")
        self.recipe_changes.append(f"data: {change} (--allow-data-change)")

    def _setup_components(self, built: SparseModel) -> None:
        """Surgery (with the checkpoint's activation state, or calibration on the first training micro-batches),
        the run's components around it, LoRA, and the engine's wrapping, in this order (it fixes the order in which
        random initializations draw from the seeded RNG)."""
        r = self.recipe
        self.components = build_components(r)
        model = built.model
        setup = Setup(recipe=r, model=model, device=self.device, accelerator=self.accelerator,
                      load_model=lambda: self._load_model().model, eval_context=self._eval_context)
        for c in self.components:
            c.before_surgery(setup)
        mlps = built.surgery(r.relufy, state_from=self.resume_from, device=self.device, seed=r.train.seed,
                             progress=self.is_main, calibration=lambda n: eval_batches(
                                 self.train_data, r.train.micro_batch_size, n))
        self.recorder = setup.recorder = attach_recorder(mlps, None, r.sparsity.near_zero_threshold)
        if r.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        for c in self.components:
            c.after_surgery(setup)
        self.model, self.optimizer, self.scheduler = self.engine.prepare(built.with_peft(r.peft))
        setup.model, setup.engine = self.model, self.engine
        for c in self.components:
            c.after_prepare(setup)

    def _open_run_dir(self) -> None:
        failed: list = [None]
        if self.is_main:
            try:
                self._write_run_dir()
            except OSError as exc:  # a full or read-only disk: one line, on every rank
                failed[0] = f"cannot write into output_dir {self.run_dir}: {storage_failure(exc) or exc}"
        if self.accelerator.num_processes > 1:
            broadcast_object_list(failed)
        if failed[0]:
            raise SparsetuneError(failed[0])
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.wandb = WandbRun(self.recipe.wandb, self.run_dir, self.recipe.model_dump(mode="json"),
                                  run_id=self.progress.wandb_run_id)

    def _write_run_dir(self) -> None:
        self.store.clean_debris(self.notice)  # under the lock: nothing here belongs to a live process
        if self.clear_run_dir:
            clear_run(self.run_dir, self.notice)
        if mark_run(self.run_dir, self.command):
            self.written.append(self.run_dir / RUN_MARKER)
        recipe_file = self.run_dir / "recipe.yaml"
        if not recipe_file.exists():
            self.written.append(recipe_file)
        write_atomic(recipe_file, recipe_to_yaml(self.recipe))
        if self.recipe_changes:  # what the resume changed, and from which step: the recipe's history
            with open(self.run_dir / "recipe-history.jsonl", "a") as f:
                f.write(json.dumps({"step": self.progress.step, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "from": str(self.resume_from or "a restart before the first checkpoint"),
                                    "changes": self.recipe_changes}) + "\n")
        if self.resume_from is not None:
            # A resume starts the lineage at its checkpoint: newer checkpoints are set aside (never deleted),
            # and what was logged after the checkpoint is dropped, so no step is logged twice.
            self.store.set_aside_after(self.progress.step, self.notice)
            if self.resume_from.parent.resolve() == self.store.root.resolve():
                self.store.point_latest_at(self.resume_from)
            self.files.drop_torn_lines(self.notice)
            self.files.truncate_after(self.progress.step)

    # ------------------------------------------------------------- checkpoint
    def _checkpoint_parts(self) -> list[CheckpointPart]:
        """What a checkpoint holds, in the order it is written and restored (see checkpoint/state.py)."""
        parts = [
            CheckpointPart("weights and optimizer", every_rank=True,  # collective under ZeRO-3 / FSDP2
                           save=lambda f: self.engine.save_state(self.model, self.optimizer, f),
                           load=lambda f: self.engine.load_state(self.model, self.optimizer, f)),
            CheckpointPart("tokenizer", save=lambda f: self.tokenizer.save_pretrained(f / "tokenizer")),
            CheckpointPart("base model", save=lambda f: write_base_fingerprint(f, self.base_fingerprint)),
            CheckpointPart("data fingerprint", save=lambda f: write_json(f / DATA_FINGERPRINT, self.data_fingerprint)),
            # what calibration and conversions computed; the builder puts it back in setup, before anything runs
            CheckpointPart("activation state", save=lambda f: save_activation_state(self.model, f)),
        ]
        if self.scheduler is not None:
            parts.append(CheckpointPart(
                "LR scheduler", save=lambda f: torch.save(self.scheduler.state_dict(), f / "scheduler.pt"),
                load=lambda f: self.scheduler.load_state_dict(load_torch_state(f / "scheduler.pt"))))
        for c in self.components:
            if c.has_state:
                parts.append(CheckpointPart(c.name, save=lambda f, c=c: c.save(f, self.progress.last_eval),
                                            load=c.load))
        parts += [
            CheckpointPart("progress", save=self._save_progress, load=self._load_progress),
            CheckpointPart("RNG", every_rank=True, save=lambda f: write_json(
                f / f"rng_state_rank{self.accelerator.process_index}.json", rng_state()), load=self._load_rng),
            CheckpointPart("recipe", save=lambda f: (f / "recipe.yaml").write_text(recipe_to_yaml(self.recipe))),
        ]
        return parts

    def _save_progress(self, folder: Path) -> None:
        self.progress.data_position = self.stream.position
        self.progress.num_processes = self.accelerator.num_processes
        if self.wandb:
            self.progress.wandb_run_id = self.wandb.run_id
        write_json(folder / "trainer_state.json", self.progress.to_json())

    def _load_progress(self, folder: Path) -> None:
        self.progress = TrainingProgress.from_json(read_trainer_state(folder))
        self.stream.position = self.progress.data_position

    def _load_rng(self, folder: Path) -> None:
        rng = read_rng_state(folder, self.accelerator.process_index)
        if rng is not None:
            set_rng_state(rng)
        else:
            self.notice(f"resume: rng_state_rank{self.accelerator.process_index}.json not in the checkpoint "
                        "(different number of processes); this rank's RNG starts from the seed")

    def _restore(self, ckpt: Path) -> None:
        Checkpointer.restore(self._checkpoint_parts(), ckpt)
        if self.scheduler is not None:  # the recipe's LR, weight decay, betas and schedule, not the saved ones
            apply_recipe_after_restore(self.scheduler, self.recipe.train)
        self.notice(f"resuming from {ckpt} at step {self.progress.step} ({self.progress.tokens_seen} tokens seen)")

    def save_checkpoint(self) -> Path | None:
        """Every rank takes part (ZeRO-3/FSDP gather the weights; each rank writes its RNG state); the main process
        writes the rest and commits the folder atomically (training/checkpointing.py)."""
        checkpointer = Checkpointer(self.store, self.accelerator, self._any_rank, self.command)
        return checkpointer.save(self._checkpoint_parts(), self.progress.step, self.recipe.train.keep_checkpoints,
                                 meta={}, before_error=lambda: self.wandb.finish() if self.wandb else None)

    # ---------------------------------------------------------------- logging
    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.to(self.device), reduction="sum") if self.accelerator.num_processes > 1 else t

    def _any_rank(self, flag: bool) -> bool:
        return bool(self._reduce_sum(torch.tensor(float(flag), device=self.device)).item() > 0)

    def _window_means(self, window: list[dict]) -> dict:
        """Mean of each step metric over the logging window and over all ranks (each rank saw its own batches)."""
        keys = list(window[-1])
        local = torch.tensor([sum(w.get(k, 0.0) for w in window) / len(window) for k in keys], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            local = self._reduce_sum(local).cpu() / self.accelerator.num_processes
        return {f"train/{k}": float(v) for k, v in zip(keys, local)}

    def _log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        record = {"step": self.progress.step, "tokens": self.progress.tokens_seen, **metrics}
        self.files.log(record)
        self.wandb.log({**metrics, "tokens": self.progress.tokens_seen}, step=self.progress.step)

    def _held_out_batches(self, n: int) -> list[dict]:
        r = self.recipe
        return list(eval_batches(self.eval_data, r.train.micro_batch_size, n, self.accelerator.process_index,
                                 self.accelerator.num_processes))

    def _eval_context(self) -> EvalContext:
        r = self.recipe
        reduce = self._reduce_sum if self.accelerator.num_processes > 1 else None
        return EvalContext(self.model, self.device, reduce, self._held_out_batches, self.progress.step,
                           train_batches=lambda n: list(eval_batches(self.train_data, r.train.micro_batch_size, n)),
                           sharded=self.engine.shards_parameters)

    def evaluate(self) -> dict:
        r = self.recipe
        batches = self._held_out_batches(r.train.eval_batches)
        if self.engine.shards_parameters:  # every forward is collective: ranks short of batches run padding ones
            counts = eval_batch_counts(len(self.eval_data), r.train.micro_batch_size, r.train.eval_batches,
                                       self.accelerator.num_processes)
            batches += [padding_batch(self.eval_data)] * (max(counts) - len(batches))
        reduce = self._reduce_sum if self.accelerator.num_processes > 1 else None
        for c in self.components:
            c.begin_eval()
        result = evaluate(self.model, batches, self.recorder, self.device, all_reduce=reduce)
        metrics = {"eval/loss": result["loss"], "eval/perplexity": result["perplexity"],
                   **layer_metrics("eval", result)}
        row = {"step": self.progress.step, "tokens": self.progress.tokens_seen, "perplexity": result["perplexity"],
               "eval_loss": result["loss"], "sparsity": result.get("sparsity"),
               "near_zero_sparsity": result.get("near_zero")}
        ctx = self._eval_context()
        tables, images = {}, {}
        for c in self.components:
            report = c.end_eval(ctx)
            metrics.update(report.metrics)
            row.update(report.row)
            result.update(report.result)
            tables.update(report.tables)
            images.update(report.images)
        self.progress.last_eval = {"step": self.progress.step, **result}
        self._log(metrics)
        if self.is_main:
            self.files.add_tradeoff(row)
            rows = [[row.get(c) for c in TRADEOFF_COLUMNS] for row in self.files.tradeoff_rows()]
            self.wandb.log_table("tradeoff", TRADEOFF_COLUMNS, rows, step=self.progress.step)
            for name, (columns, table_rows) in tables.items():
                self.wandb.log_table(name, columns, table_rows, step=self.progress.step)
            for name, path in images.items():
                self.wandb.log_image(name, path, step=self.progress.step)
        return result

    # ------------------------------------------------------------------ steps
    @property
    def total_steps(self) -> int:
        """Every phase's steps (training/phases.py)."""
        return self.phases.total_steps

    def _loss_step(self, batch: dict, engine: Engine) -> tuple[torch.Tensor | None, dict]:
        """One micro-batch's forward and its loss: the LM loss plus every component's terms, in component order.
        Returns (the loss to backpropagate, the logged parts). In a phase whose engine does not train the model,
        only the components' own losses (the predictors') are backpropagated."""
        self.recorder.open(None)
        with engine.forward_context():
            out = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
        self.recorder.close()
        loss, extra = out.loss, None
        parts = {"lm_loss": out.loss.detach()}
        ctx = StepContext(self.model, out, batch)
        for c in self.components:
            for term in c.loss_terms(ctx):
                parts[term.name] = term.value.detach()
                if term.added is None:
                    continue
                if term.model_loss:
                    loss = loss + term.added
                else:  # a component's own loss (predictors): trains the component, not part of train/loss
                    extra = term.added if extra is None else extra + term.added
        parts["loss"] = loss.detach()
        if not engine.trains_model:
            return extra, parts
        return (loss if extra is None else loss + extra), parts

    def train_step(self) -> dict:
        r = self.recipe
        accum = r.train.grad_accum_steps
        step = self.progress.step
        engine = self.phases.engine_at(step)
        if engine is not self.engine_in_use:  # a new phase begins (also when a resume starts inside it)
            if self.is_main:
                self.notice(f"step {step + 1} on: {engine.describe()}")
            self.engine_in_use = engine
        for c in self.components:
            c.begin_step(step, engine.trains_model)
        sums = {"loss": 0.0, "lm_loss": 0.0, **{k: 0.0 for c in self.components for k in c.step_metric_keys}}
        for micro in range(accum):
            batch = {k: v.to(self.device) for k, v in self.stream.next_batch().items()}
            last = micro == accum - 1
            for c in self.components:
                c.begin_micro(step * accum + micro)
            with engine.sync_context(self.model, last), self.accelerator.autocast():
                loss, parts = self._loss_step(batch, engine)
                if loss is not None and loss.requires_grad:
                    engine.backward(loss, accum, last)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        grad_norm = engine.clip(self.model, r.train.max_grad_norm) if r.train.max_grad_norm > 0 else None
        # Non-finite guard: every rank agrees, and a bad step changes no weight (its data is consumed, the LR
        # schedule moves on). DeepSpeed applies its update inside backward and skips non-finite gradients itself.
        finite = math.isfinite(sums["loss"]) and (grad_norm is None or math.isfinite(float(grad_norm)))
        bad = self._any_rank(not finite)
        lr = engine.step(self.optimizer, self.scheduler, apply=not bad)
        for c in self.components:
            c.after_step(skipped=bad)
        p = self.progress
        p.step += 1
        p.tokens_seen += r.train.micro_batch_size * r.data.seq_len * accum * self.accelerator.num_processes
        p.bad_steps += int(bad)
        p.bad_steps_in_a_row = p.bad_steps_in_a_row + 1 if bad else 0
        out = {**sums, **{k: v for c in self.components for k, v in c.step_metrics().items()}, "lr": lr,
               "skipped_nonfinite": float(bad)}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def _check_bad_steps(self) -> None:
        """Stop after train.max_bad_steps non-finite steps in a row, without writing a checkpoint."""
        limit, p = self.recipe.train.max_bad_steps, self.progress
        if p.bad_steps_in_a_row == 0:
            return
        self.notice(f"step {p.step}: non-finite loss or gradient norm, update skipped ({p.bad_steps_in_a_row} in a "
                    f"row, {p.bad_steps} in total; limit train.max_bad_steps={limit})")
        if p.bad_steps_in_a_row >= limit:
            if self.wandb:
                self.wandb.finish()
            last = self.store.latest_name()
            raise SparsetuneError(
                f"train.max_bad_steps={limit}: steps {p.step - p.bad_steps_in_a_row + 1}-{p.step} all had a "
                "non-finite loss or gradient norm; stopped without saving"
                + (f" (the last good checkpoint {self.store.root / last} is intact)" if last else "")
                + "; lower train.lr or regularizer.coef, then continue with --resume")

    # -------------------------------------------------------------------- run
    def run(self) -> dict:
        # Installed first: SIGTERM / SIGINT during setup or the initial evaluation stop the run cleanly too.
        guard = PreemptionGuard().install()
        try:
            return self._run(guard)
        finally:
            guard.uninstall()
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _run(self, guard: PreemptionGuard) -> dict:
        try:
            self.setup()
            if self._stop_requested(guard):  # nothing of the run written yet: leave nothing behind
                self._undo_claim()
                if self.is_main:
                    self.notice(f"stopped during setup ({guard.signal_name}); nothing was written; start it again "
                                f"with: {self.command} --resume")
                return {}
            self._open_run_dir()
        except BaseException:
            self._undo_claim()
            raise
        self.written.clear()  # the run exists from here on: its files are kept whatever happens
        self._announce()
        if self.resume_from is None:
            self.evaluate()
            if self._stop_requested(guard):
                if self.is_main:
                    self.wandb.finish()
                    self.notice(f"stopped before step 1 ({guard.signal_name}): nothing to checkpoint yet; resume "
                                f"with: {self.command} --resume (starts the same run again from step 0)")
                return self.progress.last_eval
        elif self.progress.step >= self.total_steps:
            self.notice(f"the run is already complete at step {self.progress.step} ({self.phases.describe_end()}); "
                        "raise train.max_steps to continue it")
            if self.wandb:
                self.wandb.finish()
            return self.progress.last_eval
        bar = tqdm(total=self.total_steps, initial=self.progress.step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
        try:
            return self._loop(guard, bar)
        finally:  # an error line must start on a line of its own, not after the progress bar
            bar.close()

    def _announce(self) -> None:
        r = self.recipe
        local, total = self.engine.local_parameter_count(self.model)
        if self.engine.shards_parameters:
            print(f"sparsetune: rank {self.accelerator.process_index} holds {local:,} of {total:,} parameters "
                  f"({self.engine.describe()})", flush=True)
            for c in self.components:
                if c.teacher is not None:
                    f_local, f_total = self.engine.local_parameter_count(c.teacher)
                    print(f"sparsetune: rank {self.accelerator.process_index} holds {f_local:,} of {f_total:,} "
                          f"{c.name} teacher parameters", flush=True)
        if self.is_main:
            n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
            print(f"sparsetune: {r.model.path} ({total / 1e6:.1f}M params, {n_train / 1e6:.2f}M trainable), "
                  f"activation={r.relufy.activation}, regularizer={r.regularizer.type}, "
                  f"{len(self.train_data)} train / {len(self.eval_data)} held-out sequences of {r.data.seq_len} "
                  f"tokens, {self.accelerator.num_processes} process(es) on {self.device} "
                  f"({self.engine.describe()})", flush=True)

    def _stop_requested(self, guard: PreemptionGuard) -> bool:
        flag = torch.tensor(float(guard.should_stop(self.progress.step)), device=self.device)
        if self.accelerator.num_processes > 1:  # every rank stops at the same step
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _log_window(self, window: list[dict], seconds: float, tokens: int) -> str:
        """Log the steps since the last log; returns the sparsity shown on the progress bar."""
        tok_s = tokens / max(seconds, 1e-9)
        stats = self.recorder.reset_stats()
        summary = stats.summary(self._reduce_sum(stats.merge_counts()))
        metrics = self._window_means(window)
        metrics["train/tokens_per_s"] = tok_s
        metrics["train/skipped_steps_total"] = float(self.progress.bad_steps)
        metrics.update(layer_metrics("train", summary))
        reduce = self._reduce_sum if self.accelerator.num_processes > 1 else None
        for c in self.components:
            metrics.update(c.log_metrics(reduce))
        self._log(metrics)
        return f"loss={metrics['train/loss']:.3f}, sparsity={summary.get('sparsity', 0):.1%}, tok_s={tok_s:.0f}"

    def _loop(self, guard: PreemptionGuard, bar) -> dict:
        r, p = self.recipe, self.progress
        window: list[dict] = []
        t0, tokens0 = time.perf_counter(), p.tokens_seen
        end = self.total_steps
        while p.step < end:
            window.append(self.train_step())
            bar.update(1)
            self._check_bad_steps()
            if p.step % r.train.log_every == 0 or p.step in (r.train.max_steps, end):
                bar.set_postfix_str(self._log_window(window, time.perf_counter() - t0, p.tokens_seen - tokens0))
                window, t0, tokens0 = [], time.perf_counter(), p.tokens_seen
            if p.step >= end:
                break
            if r.train.eval_every and p.step % r.train.eval_every == 0:
                self.evaluate()
            if r.train.save_every and p.step % r.train.save_every == 0:
                if p.bad_steps_in_a_row:  # never replace a good checkpoint right after a bad step
                    self.notice(f"step {p.step}: checkpoint postponed (the last step was skipped as non-finite)")
                else:
                    self.save_checkpoint()
            if self._stop_requested(guard):
                bar.close()
                ckpt = self.save_checkpoint()
                if self.is_main:
                    self.wandb.finish()
                    self.notice(f"stopped at step {p.step} ({guard.signal_name}); checkpoint {ckpt}; "
                                f"resume with: {self.command} --resume")
                return p.last_eval
        bar.close()
        for c in sorted(self.components, key=lambda c: c.order if c.finish_order is None else c.finish_order):
            c.finish_training(self._eval_context())
        final = self.evaluate()
        ckpt = self.save_checkpoint()
        self._finish(final, ckpt)
        return final

    def close(self) -> None:
        """Tear the process group down before the interpreter exits (gloo's threads otherwise abort the process
        at exit now and then, turning a finished run into a failed launch)."""
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            self.accelerator.end_training()

    def _finish(self, final: dict, ckpt: Path | None) -> None:
        if not self.is_main:
            return
        plot = plot_tradeoff(self.files.tradeoff_rows(), self.run_dir / "tradeoff.png",
                             f"{self.run_dir.name}: {self.recipe.relufy.activation} + {self.recipe.regularizer.type}")
        if plot is not None:
            self.wandb.log_image("tradeoff_plot", plot, step=self.progress.step)
        self.wandb.finish()
        sparsity = final.get("sparsity", 0.0)
        near = f", near-zero {final['near_zero']:.1%}" if "near_zero" in final else ""
        export = shlex.join(["sparsetune", "export", str(self.run_dir), "--out", str(self.run_dir / "export")])
        print(f"sparsetune: done at step {self.progress.step}: held-out perplexity {final['perplexity']:.2f}, "
              f"activation sparsity {sparsity:.1%}{near}; checkpoint {ckpt}; export with: {export}", flush=True)


def train(recipe: Recipe, overwrite: bool = False, resume: bool | str | None = None,
          command: str = "sparsetune train RECIPE", allow_data_change: bool = False) -> dict:
    """Run a recipe to the end (or to a preemption); returns the last held-out evaluation."""
    trainer = Trainer(recipe, overwrite=overwrite, resume=resume, command=command,
                      allow_data_change=allow_data_change)
    try:
        return trainer.run()
    finally:
        trainer.close()
