"""The training run: setup -> (eval) -> steps -> eval / checkpoint -> final eval, plot, checkpoint.

Read top to bottom: `Trainer.run()` is the whole program. The model is built by the one builder
(`models/build.py`: load, surgery with its stored state and calibration, LoRA); the features of a run (sparsity
regularization, distillation, co-trained predictors, threshold conversion) are components with one protocol
(`training/components/`); how the model is distributed is an engine chosen once (`training/engines.py`), and the
predictor-only steps are a phase run by the FrozenModel engine (`training/phases.py`). None of them appears as a
branch here.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from sparsetune.checkpoint.activation_state import save_activation_state
from sparsetune.checkpoint.base_model import write_base_fingerprint
from sparsetune.checkpoint.parts import CheckpointPart
from sparsetune.checkpoint.state import (
    load_torch_state,
    read_rng_state,
    read_trainer_state,
    rng_state,
    set_rng_state,
    write_json,
)
from sparsetune.console import notice
from sparsetune.data.batches import BatchStream, eval_batch_counts, eval_batches, padding_batch
from sparsetune.data.fingerprint import FILE as DATA_FINGERPRINT
from sparsetune.data.fingerprint import data_fingerprint
from sparsetune.data.text_datasets import load_text_splits, pack
from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.perplexity import evaluate
from sparsetune.launch.compatibility import check_launch
from sparsetune.models.build import SparseModel
from sparsetune.recipe.loading import recipe_to_yaml
from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.recorder import attach_recorder
from sparsetune.tracking.files import TRADEOFF_COLUMNS
from sparsetune.tracking.memory import MemoryMonitor, memory_postfix
from sparsetune.tracking.metrics import layer_metrics
from sparsetune.tracking.plots import plot_tradeoff
from sparsetune.tracking.wandb_run import WandbRun
from sparsetune.training.checkpointing import Checkpointer
from sparsetune.training.components import build_components, judge_resume
from sparsetune.training.components.base import Component, EvalContext, Setup, StepContext
from sparsetune.training.engines import Engine, skip_cpu_deepspeed_shm_build
from sparsetune.training.optim import apply_recipe_after_restore
from sparsetune.training.phases import Phases
from sparsetune.training.preemption import PreemptionGuard
from sparsetune.training.progress import TrainingProgress
from sparsetune.training.run_folder import RunDir


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
        self.overwrite = overwrite
        self.resume = resume
        self.command = command
        self.progress = TrainingProgress()
        self.folder = RunDir(Path(recipe.output_dir), command)  # output_dir: claim, plan, resume, files, lock
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
        self.wandb: WandbRun | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        RunDir.check_name(self.folder.path)  # one line before any process group
        self._setup_distributed()
        self.folder.plan(self.recipe, self.accelerator, self.resume, self.overwrite,
                         self.engine.saves_optimizer_itself(), judge=judge_resume)
        set_seed(self.recipe.train.seed)
        model = self._setup_model_and_data()
        self.data_fingerprint = data_fingerprint(self.recipe.data, self.train_data, self.eval_data)
        self.folder.check_data(self.data_fingerprint, self.allow_data_change)
        self._setup_components(model)
        self.stream = BatchStream(self.train_data, self.recipe.train.micro_batch_size, self.recipe.train.seed,
                                  self.accelerator.process_index, self.accelerator.num_processes)
        if self.folder.resume_from is not None:
            self._restore(self.folder.resume_from)

    def _setup_distributed(self) -> None:
        r = self.recipe
        skip_cpu_deepspeed_shm_build()  # before accelerate opens DeepSpeed's process group
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(r.train.mixed_precision))
        self.engine = Engine.create(self.accelerator, r)
        self.phases = Phases(r, self.engine)
        self.engine_in_use = self.engine
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        check_launch(r, Engine.strategy_of(self.accelerator), self.engine.shards_parameters,
                     self.accelerator.num_processes, self.engine.describe())

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
        mlps = built.surgery(r.relufy, state_from=self.folder.resume_from, device=self.device, seed=r.train.seed,
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
        self.folder.open(recipe_to_yaml(self.recipe), self.progress.step, self.accelerator)
        if self.is_main:
            self.wandb = WandbRun(self.recipe.wandb, self.folder.path, self.recipe.model_dump(mode="json"),
                                  run_id=self.progress.wandb_run_id)

    # ------------------------------------------------------------- checkpoint
    def _checkpoint_parts(self) -> list[CheckpointPart]:
        """What a checkpoint holds, in the order it is written and restored (see checkpoint/state.py)."""
        parts = [
            CheckpointPart("weights and optimizer", every_rank=True,  # collective under ZeRO-3 / FSDP2
                           save=lambda f: self.engine.save_state(self.model, self.optimizer, f),
                           load=lambda f: self.engine.load_state(self.model, self.optimizer, f)),
            CheckpointPart("tokenizer", save=lambda f: self.tokenizer.save_pretrained(f / "tokenizer")),
            CheckpointPart("base model", save=lambda f: write_base_fingerprint(f, self.folder.base_fingerprint)),
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
            notice(f"resume: rng_state_rank{self.accelerator.process_index}.json not in the checkpoint "
                        "(different number of processes); this rank's RNG starts from the seed")

    def _restore(self, ckpt: Path) -> None:
        Checkpointer.restore(self._checkpoint_parts(), ckpt)
        if self.scheduler is not None:  # the recipe's LR, weight decay, betas and schedule, not the saved ones
            apply_recipe_after_restore(self.scheduler, self.recipe.train)
        notice(f"resuming from {ckpt} at step {self.progress.step} ({self.progress.tokens_seen} tokens seen)")

    def save_checkpoint(self) -> Path | None:
        """Every rank takes part (ZeRO-3/FSDP gather the weights; each rank writes its RNG state); the main process
        writes the rest and commits the folder atomically (training/checkpointing.py)."""
        checkpointer = Checkpointer(self.folder.store, self.accelerator, self._any_rank, self.command)
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
        self.folder.files.log(record)
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
            self.folder.files.add_tradeoff(row)
            rows = [[row.get(c) for c in TRADEOFF_COLUMNS] for row in self.folder.files.tradeoff_rows()]
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
            notice(f"step {step + 1} on: {engine.describe()}", main=self.is_main)
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
        notice(f"step {p.step}: non-finite loss or gradient norm, update skipped ({p.bad_steps_in_a_row} in a "
                    f"row, {p.bad_steps} in total; limit train.max_bad_steps={limit})")
        if p.bad_steps_in_a_row >= limit:
            if self.wandb:
                self.wandb.finish()
            last = self.folder.store.latest_name()
            raise SparsetuneError(
                f"train.max_bad_steps={limit}: steps {p.step - p.bad_steps_in_a_row + 1}-{p.step} all had a "
                "non-finite loss or gradient norm; stopped without saving"
                + (f" (the last good checkpoint {self.folder.store.root / last} is intact)" if last else "")
                + "; lower train.lr or regularizer.coef, then continue with --resume")

    # -------------------------------------------------------------------- run
    def run(self) -> dict:
        # Installed first: SIGTERM / SIGINT during setup or the initial evaluation stop the run cleanly too.
        guard = PreemptionGuard().install()
        try:
            return self._run(guard)
        finally:
            guard.uninstall()
            self.folder.release()

    def _run(self, guard: PreemptionGuard) -> dict:
        try:
            self.setup()
            if self._stop_requested(guard):  # nothing of the run written yet: leave nothing behind
                self.folder.undo()
                notice(f"stopped during setup ({guard.signal_name}); nothing was written; start it again with: "
                       f"{self.command} --resume", main=self.is_main)
                return {}
            self._open_run_dir()
        except BaseException:
            self.folder.undo()
            raise
        self.folder.keep()  # the run exists from here on: its files are kept whatever happens
        self._announce()
        if self.folder.resume_from is None:
            self.evaluate()
            if self._stop_requested(guard):
                if self.is_main:
                    self.wandb.finish()
                    notice(f"stopped before step 1 ({guard.signal_name}): nothing to checkpoint yet; resume with: "
                           f"{self.command} --resume (starts the same run again from step 0)")
                return self.progress.last_eval
        elif self.progress.step >= self.total_steps:
            notice(f"the run is already complete at step {self.progress.step} ({self.phases.describe_end()}); "
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
            notice(f"rank {self.accelerator.process_index} holds {local:,} of {total:,} parameters "
                   f"({self.engine.describe()})")
            for c in self.components:
                if c.teacher is not None:
                    f_local, f_total = self.engine.local_parameter_count(c.teacher)
                    notice(f"rank {self.accelerator.process_index} holds {f_local:,} of {f_total:,} {c.name} "
                           "teacher parameters")
        if self.is_main:
            n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
            notice(f"{r.model.path} ({total / 1e6:.1f}M params, {n_train / 1e6:.2f}M trainable), "
                   f"activation={r.relufy.activation}, regularizer={r.regularizer.type}, "
                   f"{len(self.train_data)} train / {len(self.eval_data)} held-out sequences of {r.data.seq_len} "
                   f"tokens, {self.accelerator.num_processes} process(es) on {self.device} ({self.engine.describe()})")

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
        # each rank's peak memory since the last log, max and mean over ranks (tracking/memory.py)
        metrics.update(self.memory.log_metrics(reduce, self.accelerator.process_index, self.accelerator.num_processes))
        self._log(metrics)
        return (f"loss={metrics['train/loss']:.3f}, sparsity={summary.get('sparsity', 0):.1%}, tok_s={tok_s:.0f}, "
                f"{memory_postfix(metrics)}")

    def _loop(self, guard: PreemptionGuard, bar) -> dict:
        r, p = self.recipe, self.progress
        window: list[dict] = []
        self.memory = MemoryMonitor(self.device)  # the first log window starts here
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
                    notice(f"step {p.step}: checkpoint postponed (the last step was skipped as non-finite)")
                else:
                    self.save_checkpoint()
            if self._stop_requested(guard):
                bar.close()
                ckpt = self.save_checkpoint()
                if self.is_main:
                    self.wandb.finish()
                    notice(f"stopped at step {p.step} ({guard.signal_name}); checkpoint {ckpt}; resume with: "
                           f"{self.command} --resume")
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
        run_dir = self.folder.path
        plot = plot_tradeoff(self.folder.files.tradeoff_rows(), run_dir / "tradeoff.png",
                             f"{run_dir.name}: {self.recipe.relufy.activation} + {self.recipe.regularizer.type}")
        if plot is not None:
            self.wandb.log_image("tradeoff_plot", plot, step=self.progress.step)
        self.wandb.finish()
        sparsity = final.get("sparsity", 0.0)
        near = f", near-zero {final['near_zero']:.1%}" if "near_zero" in final else ""
        export = shlex.join(["sparsetune", "export", str(run_dir), "--out", str(run_dir / "export")])
        notice(f"done at step {self.progress.step}: held-out perplexity {final['perplexity']:.2f}, activation "
               f"sparsity {sparsity:.1%}{near}; checkpoint {ckpt}; export with: {export}")


def train(recipe: Recipe, overwrite: bool = False, resume: bool | str | None = None,
          command: str = "sparsetune train RECIPE", allow_data_change: bool = False) -> dict:
    """Run a recipe to the end (or to a preemption); returns the last held-out evaluation."""
    trainer = Trainer(recipe, overwrite=overwrite, resume=resume, command=command,
                      allow_data_change=allow_data_change)
    try:
        return trainer.run()
    finally:
        trainer.close()
