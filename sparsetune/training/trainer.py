"""The training run: setup -> (eval) -> steps -> eval / checkpoint -> final eval, plot, checkpoint.

Read top to bottom: `Trainer.run()` is the whole program.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from sparsetune.checkpoint.folders import clear_run, inspect_run_folder, mark_run
from sparsetune.checkpoint.resume import check_process_count, check_recipe, load_model_weights, plan_output_dir
from sparsetune.checkpoint.state import (is_lora_checkpoint, load_torch_state, read_rng_state, read_trainer_state, rng_state,
                                         save_trainer_files, set_rng_state, write_json)
from sparsetune.checkpoint.store import CheckpointStore, write_atomic
from sparsetune.data.batches import BatchStream, eval_batch_counts, eval_batches, padding_batch
from sparsetune.data.text_datasets import load_text_splits, pack
from sparsetune.errors import SparsetuneError
from sparsetune.evaluation.perplexity import evaluate
from sparsetune.models.build import apply_lora
from sparsetune.models.loading import load_model_and_tokenizer
from sparsetune.recipe.loading import recipe_to_yaml
from sparsetune.recipe.schema import Recipe
from sparsetune.sparsity.recorder import attach_recorder
from sparsetune.sparsity.regularizers import REGULARIZERS
from sparsetune.sparsity.schedules import CoefficientSchedule
from sparsetune.surgery.calibration import calibrate_cats, needs_calibration
from sparsetune.surgery.relufy import relufy
from sparsetune.tracking.files import TRADEOFF_COLUMNS, MetricFiles
from sparsetune.tracking.plots import plot_tradeoff
from sparsetune.tracking.wandb_run import WandbRun
from sparsetune.training.distill import Teacher, kl_to_teacher
from sparsetune.launch.compatibility import check_launch
from sparsetune.training.engines import Engine
from sparsetune.training.optim import build_optimizer, build_scheduler
from sparsetune.training.preemption import PreemptionGuard, maybe_kill_in_save
from sparsetune.training.predictor_step import PredictorTraining


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def layer_metrics(prefix: str, summary: dict) -> dict:
    """Flat metric keys from a SparsityStats summary: mean and per-layer (exact zeros and near-zero)."""
    out = {}
    if "sparsity" in summary:
        out[f"{prefix}/sparsity"] = summary["sparsity"]
        out.update({f"{prefix}/sparsity_layer/{i:02d}": v for i, v in enumerate(summary["per_layer"])})
    if "near_zero" in summary:
        thr = summary["near_zero_threshold"]
        out[f"{prefix}/near_zero_sparsity@{thr:g}"] = summary["near_zero"]
        out.update({f"{prefix}/near_zero_layer@{thr:g}/{i:02d}": v for i, v in enumerate(summary["near_zero_per_layer"])})
    return out


class Trainer:
    """One run of a recipe. `resume`: None/False = new run; True = newest complete checkpoint in
    output_dir (a fresh start when there is none); a path = that checkpoint folder."""

    def __init__(self, recipe: Recipe, overwrite: bool = False, resume: bool | str | None = None,
                 command: str = "sparsetune train RECIPE"):
        self.recipe = recipe
        self.run_dir = Path(recipe.output_dir)
        self.overwrite = overwrite
        self.resume = resume
        self.command = command
        self.resume_from: Path | None = None
        self.step = 0
        self.tokens_seen = 0
        self.last_eval: dict = {}
        self.wandb_run_id: str | None = None
        self.bad_steps = 0  # steps skipped for a non-finite loss or gradient norm (all of them, and the current run)
        self.bad_steps_in_a_row = 0

    @staticmethod
    def notice(message: str) -> None:
        print(f"sparsetune: {message}", flush=True)

    # ------------------------------------------------------------------ setup
    def _plan_output_dir(self) -> None:
        """The main process decides how output_dir is used (and verifies the checkpoint it resumes from, once);
        every rank gets the same decision, or the same one-line error."""
        r = self.recipe
        decision: list = [None]
        if self.is_main:
            try:
                plan = plan_output_dir(self.run_dir, self.resume, self.overwrite, report=self.notice)
                if plan.resume_from is not None:
                    check_recipe(plan.resume_from, r, report=self.notice)
                    check_process_count(plan.resume_from, self.accelerator.num_processes,
                                        self.engine.saves_optimizer_itself() and not r.train.freeze_model)
                decision[0] = ("ok", plan, r.relufy.thresholds)
            except SparsetuneError as exc:
                decision[0] = ("error", str(exc), None)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision)
        status, plan, thresholds = decision[0]
        if status == "error":
            raise SparsetuneError(plan)
        self.plan, self.resume_from = plan, plan.resume_from
        if thresholds is not None:  # CATS thresholds reused from the checkpoint (check_recipe ran on main)
            r.relufy.thresholds = thresholds

    def setup(self) -> None:
        r = self.recipe
        inspect_run_folder(self.run_dir)  # a file where the folder should be: one line before any process group
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(r.train.mixed_precision))
        self.engine = Engine.create(self.accelerator, r)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self._plan_output_dir()
        check_launch(r, self.engine.name, self.engine.shards_parameters, self.accelerator.num_processes,
                     self.engine.name)
        set_seed(r.train.seed)

        model, self.tokenizer = load_model_and_tokenizer(r.model.path, r.model.dtype, r.model.revision,
                                                         r.model.trust_remote_code)
        train_text, eval_text = load_text_splits(r.data)
        with self.accelerator.main_process_first():
            self.train_data = pack(train_text, self.tokenizer, r.data.text_field, r.data.seq_len, "data.path")
            self.eval_data = pack(eval_text, self.tokenizer, r.data.text_field, r.data.seq_len, "held-out data")

        self.teacher = None
        if r.distill.weight > 0:
            self.teacher = Teacher(self._teacher_model(model) if r.peft.method == "none" else None)
        mlps = relufy(model, r.relufy)
        if needs_calibration(model):
            self._calibrate(model)
        self.recorder = attach_recorder(mlps, REGULARIZERS.get(r.regularizer.type), r.sparsity.near_zero_threshold)
        if r.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.predictors = PredictorTraining.build(model, r, self.recorder, self.device) if r.predictor.enabled else None
        if r.peft.method == "lora":
            model = apply_lora(model, r)
        self.schedule = CoefficientSchedule(r.regularizer, r.train.max_steps)

        if self.teacher is not None:
            self.teacher.place(self.engine)
        if r.train.freeze_model:  # predictor-only: the model neither trains nor needs DDP
            model.requires_grad_(False)
            self.model, self.optimizer, self.scheduler = model.to(self.device), None, None
        else:
            built = []
            # The LR scheduler is stepped by hand once per optimizer step (not prepared), so the LR
            # at step n is the same whatever the number of processes.
            self.model, self.optimizer = self.engine.prepare(
                model, lambda params: built.append(build_optimizer(params, r.train)) or built[0])
            self.scheduler = build_scheduler(built[0], r.train)
        self.stream = BatchStream(self.train_data, r.train.micro_batch_size, r.train.seed,
                                  self.accelerator.process_index, self.accelerator.num_processes)
        self.store = CheckpointStore(self.run_dir)
        if self.resume_from is not None:
            self._restore(self.resume_from)

    def _teacher_model(self, model):
        """A frozen copy of the dense model to distil from. Under ZeRO-3 transformers may load the student already
        partitioned (deepspeed.zero.Init), and a copy of a partitioned module holds empty tensors: the teacher
        is then loaded a second time, partitioned the same way."""
        if not any(hasattr(p, "ds_id") for p in model.parameters()):
            return copy.deepcopy(model)
        r = self.recipe
        teacher, _ = load_model_and_tokenizer(r.model.path, r.model.dtype, r.model.revision, r.model.trust_remote_code)
        return teacher

    def _calibrate(self, model) -> None:
        """CATS thresholds from the first training micro-batches (the same on every rank); they are
        written into the run's recipe, so checkpoints, resume and export carry them."""
        r = self.recipe
        n = r.relufy.calibration_batches
        model.to(self.device)
        thresholds = calibrate_cats(model, eval_batches(self.train_data, r.train.micro_batch_size, n), self.device,
                                    total=n, seed=r.train.seed, progress=self.is_main)
        self.recipe.relufy.thresholds = thresholds
        self.notice(f"cats: calibrated {len(thresholds)} layer thresholds to {r.relufy.target_sparsity:.0%} sparsity "
                    f"on {n} training micro-batches (range {min(thresholds):.4g}..{max(thresholds):.4g})")

    def _restore(self, ckpt: Path) -> None:
        """Everything a checkpoint holds: weights, optimizer, LR scheduler, step, tokens, data position, RNG.
        A file that cannot be read (damaged in a way its marker could not tell) stops with one line."""
        try:
            self._restore_state(ckpt)
        except SparsetuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the library raised, the cause is the file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise SparsetuneError(f"checkpoint {ckpt} could not be read ({type(exc).__name__}: {first}); nothing was "
                                  "changed; resume from an earlier checkpoint with --resume CHECKPOINT") from None

    def _restore_state(self, ckpt: Path) -> None:
        if self.optimizer is not None and self.engine.saves_optimizer_itself():
            self.engine.load(self.model, self.optimizer, ckpt)  # weights and the sharded optimizer state
        else:
            load_model_weights(self.accelerator.unwrap_model(self.model), ckpt / "model", is_lora_checkpoint(ckpt))
            if self.optimizer is not None:
                self.optimizer.load_state_dict(load_torch_state(ckpt / "optimizer.pt"))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(load_torch_state(ckpt / "scheduler.pt"))
        if self.predictors is not None:
            self.predictors.load(ckpt)
        state = read_trainer_state(ckpt)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.stream.position = state["data_position"]
        self.last_eval = state.get("last_eval", {})
        self.wandb_run_id = state.get("wandb_run_id")
        self.bad_steps, self.bad_steps_in_a_row = state.get("bad_steps", 0), state.get("bad_steps_in_a_row", 0)
        rng = read_rng_state(ckpt, self.accelerator.process_index)
        if rng is not None:
            set_rng_state(rng)
        else:
            self.notice(f"resume: rng_state_rank{self.accelerator.process_index}.json not in the checkpoint "
                        "(different number of processes); this rank's RNG starts from the seed")
        self.notice(f"resuming from {ckpt} at step {self.step} ({self.tokens_seen} tokens seen)")

    def _open_run_dir(self) -> None:
        self.files = MetricFiles(self.run_dir)
        if self.is_main:
            if self.plan.clear:
                clear_run(self.run_dir, self.notice)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            mark_run(self.run_dir, self.command)
            write_atomic(self.run_dir / "recipe.yaml", recipe_to_yaml(self.recipe))
            if self.resume_from is not None:
                # A resume starts the lineage at its checkpoint: newer checkpoints are set aside (never deleted),
                # and what was logged after the checkpoint is dropped, so no step is logged twice.
                self.store.set_aside_after(self.step, self.notice)
                if self.resume_from.parent.resolve() == self.store.root.resolve():
                    self.store.point_latest_at(self.resume_from)
                self.files.drop_torn_lines(self.notice)
                self.files.truncate_after(self.step)
        self.accelerator.wait_for_everyone()
        self.wandb = (WandbRun(self.recipe.wandb, self.run_dir, self.recipe.model_dump(mode="json"),
                               run_id=self.wandb_run_id) if self.is_main else None)

    # ---------------------------------------------------------------- logging
    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.to(self.device), reduction="sum") if self.accelerator.num_processes > 1 else t

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
        record = {"step": self.step, "tokens": self.tokens_seen, **metrics}
        self.files.log(record)
        self.wandb.log({**metrics, "tokens": self.tokens_seen}, step=self.step)

    def evaluate(self) -> dict:
        r = self.recipe
        batches = list(eval_batches(self.eval_data, r.train.micro_batch_size, r.train.eval_batches,
                                    self.accelerator.process_index, self.accelerator.num_processes))
        if self.engine.shards_parameters:  # every forward is collective: ranks short of batches run padding ones
            counts = eval_batch_counts(len(self.eval_data), r.train.micro_batch_size, r.train.eval_batches,
                                       self.accelerator.num_processes)
            batches += [padding_batch(self.eval_data)] * (max(counts) - len(batches))
        reduce = self._reduce_sum if self.accelerator.num_processes > 1 else None
        if self.predictors is not None:
            self.predictors.begin_eval()
        result = evaluate(self.model, batches, self.recorder, self.device, all_reduce=reduce)
        metrics = {"eval/loss": result["loss"], "eval/perplexity": result["perplexity"], **layer_metrics("eval", result)}
        row_extra = {}
        if self.predictors is not None:
            pred = self.predictors.end_eval(reduce)
            dyn = {}
            if r.predictor.dynamic_eval_batches:
                dyn = self.predictors.dynamic_eval(self.model, eval_batches(
                    self.eval_data, r.train.micro_batch_size, r.predictor.dynamic_eval_batches,
                    self.accelerator.process_index, self.accelerator.num_processes), self.device, reduce)
            result["predictor"], result["dynamic"] = pred, dyn
            metrics.update(PredictorTraining.flat_metrics("eval", pred, dyn))
            row_extra = PredictorTraining.tradeoff_fields(pred, dyn)
        self.last_eval = {"step": self.step, **result}
        self._log(metrics)
        if self.is_main:
            row = {"step": self.step, "tokens": self.tokens_seen, "perplexity": result["perplexity"],
                   "eval_loss": result["loss"], "sparsity": result.get("sparsity"),
                   "near_zero_sparsity": result.get("near_zero"), "reg_coef": self.schedule(self.step), **row_extra}
            self.files.add_tradeoff(row)
            rows = [[row.get(c) for c in TRADEOFF_COLUMNS] for row in self.files.tradeoff_rows()]
            self.wandb.log_table("tradeoff", TRADEOFF_COLUMNS, rows, step=self.step)
        return result

    # ------------------------------------------------------------- checkpoint
    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor(float(flag), device=self.device)
        return bool(self._reduce_sum(t).item() > 0)

    def _save_failed(self, error: OSError | None) -> None:
        """Every rank learns whether any rank failed to write its share; then all stop with one line, the
        unfinished folder removed (giving the space back) and the previous checkpoint and `latest` untouched."""
        if not self._any_rank(error is not None):
            return
        if self.is_main:
            self.store.discard(self.step)
        previous = self.store.latest_name() or "none yet"
        what = (f"{error.strerror or error} ({error.filename})" if error is not None and error.filename
                else str(error) if error is not None else "another process failed to write its part")
        if self.wandb:
            self.wandb.finish()
        raise SparsetuneError(
            f"could not write checkpoint step {self.step} in {self.store.root}: {what}; the previous checkpoint "
            f"({previous}) and checkpoints/latest are intact; free space and continue with: {self.command} --resume")

    def save_checkpoint(self) -> Path | None:
        """All ranks take part (ZeRO-3/FSDP gather the weights; each rank writes its RNG state);
        the main process writes the rest and commits the folder atomically. A failed write (disk full)
        stops every rank with one line and leaves the previous checkpoint as it was."""
        r = self.recipe
        unwrapped = self.accelerator.unwrap_model(self.model)
        state_dict = None if r.peft.method == "lora" else self.engine.full_state_dict(self.model)
        trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "data_position": self.stream.position,
                         "wandb_run_id": self.wandb.run_id if self.wandb else self.wandb_run_id,
                         "num_processes": self.accelerator.num_processes, "last_eval": self.last_eval,
                         "bad_steps": self.bad_steps, "bad_steps_in_a_row": self.bad_steps_in_a_row}
        error: OSError | None = None
        try:
            if self.is_main:
                self.store.begin(self.step)
        except OSError as exc:
            error = exc
        self.accelerator.wait_for_everyone()
        tmp = self.store.tmp_for(self.step)
        engine_saves = self.optimizer is not None and self.engine.saves_optimizer_itself()
        try:
            if error is None:
                write_json(tmp / f"rng_state_rank{self.accelerator.process_index}.json", rng_state())
            if engine_saves:  # collective: every rank takes part even when its own file write failed
                self.engine.save(self.model, self.optimizer, tmp)
            if self.is_main and error is None:
                unwrapped.save_pretrained(tmp / "model", state_dict=state_dict)
                maybe_kill_in_save(self.step)
                self.tokenizer.save_pretrained(tmp / "tokenizer")
                save_trainer_files(tmp, r, trainer_state, None if engine_saves else self.optimizer, self.scheduler)
                if self.predictors is not None:
                    self.predictors.save(tmp, self.last_eval.get("predictor"))
        except OSError as exc:
            error = error or exc
        self._save_failed(error)
        path = None
        try:
            if self.is_main:
                path = self.store.commit(self.step, keep=r.train.keep_checkpoints,
                                         meta={"lora": r.peft.method == "lora"})
        except OSError as exc:
            error = exc
        self._save_failed(error)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        r = self.recipe
        coef = self.schedule(self.step)
        accum = r.train.grad_accum_steps
        sums = {"loss": 0.0, "lm_loss": 0.0, "reg_loss": 0.0, "distill_loss": 0.0}
        frozen = self.optimizer is None
        for micro in range(accum):
            batch = {k: v.to(self.device) for k, v in self.stream.next_batch().items()}
            last = micro == accum - 1
            sync = contextlib.nullcontext() if frozen else self.engine.sync_context(self.model, last)
            if self.predictors is not None:
                self.predictors.bank.set_position(self.step * accum + micro)
            with sync, self.accelerator.autocast():
                self.recorder.open(None, reg_with_grad=coef > 0 and not frozen)
                with torch.no_grad() if frozen else contextlib.nullcontext():
                    out = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
                self.recorder.close()
                loss = out.loss
                parts = {"lm_loss": out.loss.detach()}
                reg = self.recorder.regularizer_loss()
                if reg is not None:
                    parts["reg_loss"] = reg.detach()
                    if coef > 0:
                        loss = loss + coef * reg
                if self.teacher is not None:
                    kl = kl_to_teacher(out.logits, self.teacher.logits(self.model, batch["input_ids"]),
                                       r.distill.temperature)
                    parts["distill_loss"] = kl.detach()
                    loss = loss + r.distill.weight * kl
                parts["loss"] = loss.detach()
                pred_loss = self.predictors.bank.pop_loss() if self.predictors is not None else None
                if pred_loss is not None:  # its inputs are detached: it only reaches the predictors
                    parts["predictor_loss"] = pred_loss.detach()
                    loss = pred_loss if frozen else loss + pred_loss
                if loss.requires_grad:
                    if frozen:
                        self.accelerator.backward(loss / accum)
                    else:
                        self.engine.backward(loss, accum, last)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        grad_norm, lr = None, 0.0
        if not frozen and r.train.max_grad_norm > 0:
            grad_norm = self.engine.clip(self.model, r.train.max_grad_norm)
        # Non-finite guard: every rank agrees, and a bad step changes no weight (its data is consumed, the LR
        # schedule moves on). DeepSpeed applies its update inside backward and skips non-finite gradients itself.
        finite = math.isfinite(sums["loss"]) and (grad_norm is None or math.isfinite(float(grad_norm)))
        bad = self._any_rank(not finite)
        if not frozen:
            lr = self.scheduler.get_last_lr()[0]
            if not bad:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.predictors is not None:
            if bad:
                self.predictors.skip_step()
            else:
                self.predictors.step(self.accelerator)
        self.step += 1
        self.tokens_seen += r.train.micro_batch_size * r.data.seq_len * accum * self.accelerator.num_processes
        self.bad_steps += int(bad)
        self.bad_steps_in_a_row = self.bad_steps_in_a_row + 1 if bad else 0
        out = {**sums, "reg_coef": coef, "lr": lr, "skipped_nonfinite": float(bad)}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def _check_bad_steps(self) -> None:
        """Stop after train.max_bad_steps non-finite steps in a row, without writing a checkpoint."""
        r = self.recipe
        if self.bad_steps_in_a_row == 0:
            return
        self.notice(f"step {self.step}: non-finite loss or gradient norm, update skipped "
                    f"({self.bad_steps_in_a_row} in a row, {self.bad_steps} in total; limit train.max_bad_steps="
                    f"{r.train.max_bad_steps})")
        if self.bad_steps_in_a_row >= r.train.max_bad_steps:
            if self.wandb:
                self.wandb.finish()
            last = self.store.latest_name()
            raise SparsetuneError(
                f"train.max_bad_steps={r.train.max_bad_steps}: steps {self.step - self.bad_steps_in_a_row + 1}-"
                f"{self.step} all had a non-finite loss or gradient norm; stopped without saving"
                + (f" (the last good checkpoint {self.store.root / last} is intact)" if last else "")
                + "; lower train.lr or regularizer.coef, then continue with --resume")

    # -------------------------------------------------------------------- run
    def run(self) -> dict:
        created = not self.run_dir.exists()
        try:
            self.setup()
            self._open_run_dir()
        except BaseException:
            if created and self.is_main_safe() and self.run_dir.exists():
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        r = self.recipe
        local, total = self.engine.local_parameter_count(self.model)
        if self.engine.shards_parameters:
            print(f"sparsetune: rank {self.accelerator.process_index} holds {local:,} of {total:,} parameters "
                  f"({self.engine.describe()})", flush=True)
            if self.teacher is not None and self.teacher.copy is not None:
                t_local, t_total = self.engine.local_parameter_count(self.teacher.copy)
                print(f"sparsetune: rank {self.accelerator.process_index} holds {t_local:,} of {t_total:,} "
                      f"distillation-teacher parameters", flush=True)
        if self.is_main:
            n_params = total
            n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
            print(f"sparsetune: {r.model.path} ({n_params / 1e6:.1f}M params, {n_train / 1e6:.2f}M trainable), "
                  f"activation={r.relufy.activation}, regularizer={r.regularizer.type}, "
                  f"{len(self.train_data)} train / {len(self.eval_data)} held-out sequences of {r.data.seq_len} "
                  f"tokens, {self.accelerator.num_processes} process(es) on {self.device} "
                  f"({self.engine.describe()})", flush=True)
        if self.resume_from is None:
            self.evaluate()
        elif self.step >= r.train.max_steps:
            self.notice(f"the run is already complete at step {self.step} (train.max_steps={r.train.max_steps}); "
                        "raise train.max_steps to continue it")
            self.wandb.finish() if self.wandb else None
            return self.last_eval
        guard = PreemptionGuard().install()
        try:
            return self._loop(guard)
        finally:
            guard.uninstall()

    def _stop_requested(self, guard: PreemptionGuard) -> bool:
        flag = torch.tensor(float(guard.should_stop(self.step)), device=self.device)
        if self.accelerator.num_processes > 1:  # every rank stops at the same step
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _loop(self, guard: PreemptionGuard) -> dict:
        r = self.recipe
        bar = tqdm(total=r.train.max_steps, initial=self.step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
        try:
            return self._steps(guard, bar)
        finally:  # an error line must start on a line of its own, not after the progress bar
            bar.close()

    def _steps(self, guard: PreemptionGuard, bar) -> dict:
        r = self.recipe
        window: list[dict] = []
        t0, tokens0 = time.perf_counter(), self.tokens_seen
        sparsity_text = "-"
        while self.step < r.train.max_steps:
            window.append(self.train_step())
            bar.update(1)
            self._check_bad_steps()
            if self.step % r.train.log_every == 0 or self.step == r.train.max_steps:
                elapsed = time.perf_counter() - t0
                tok_s = (self.tokens_seen - tokens0) / max(elapsed, 1e-9)
                stats = self.recorder.reset_stats()
                counts = self._reduce_sum(stats.merge_counts())
                summary = stats.summary(counts)
                metrics = self._window_means(window)
                metrics["train/tokens_per_s"] = tok_s
                metrics["train/skipped_steps_total"] = float(self.bad_steps)
                metrics.update(layer_metrics("train", summary))
                if self.predictors is not None:
                    pred = self.predictors.pop_counts(self._reduce_sum)
                    metrics.update(PredictorTraining.flat_metrics("train", pred, None))
                self._log(metrics)
                sparsity_text = f"{summary.get('sparsity', 0):.1%}"
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", sparsity=sparsity_text, tok_s=f"{tok_s:.0f}")
                window, t0, tokens0 = [], time.perf_counter(), self.tokens_seen
            if r.train.eval_every and self.step % r.train.eval_every == 0 and self.step < r.train.max_steps:
                self.evaluate()
            if r.train.save_every and self.step % r.train.save_every == 0 and self.step < r.train.max_steps:
                if self.bad_steps_in_a_row:  # never replace a good checkpoint right after a bad step
                    self.notice(f"step {self.step}: checkpoint postponed (the last step was skipped as non-finite)")
                else:
                    self.save_checkpoint()
            if self.step < r.train.max_steps and self._stop_requested(guard):
                bar.close()
                ckpt = self.save_checkpoint()
                if self.is_main:
                    self.wandb.finish()
                    self.notice(f"stopped at step {self.step} ({guard.signal_name}); checkpoint {ckpt}; "
                                f"resume with: {self.command} --resume")
                return self.last_eval
        bar.close()
        final = self.evaluate()
        ckpt = self.save_checkpoint()
        self._finish(final, ckpt)
        return final

    def close(self) -> None:
        """Tear the process group down before the interpreter exits (gloo's threads otherwise abort the process
        at exit now and then, turning a finished run into a failed launch)."""
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.num_processes > 1:
            acc.end_training()

    def is_main_safe(self) -> bool:
        acc = getattr(self, "accelerator", None)
        return acc is None or acc.is_main_process

    def _finish(self, final: dict, ckpt: Path | None) -> None:
        if not self.is_main:
            return
        plot = plot_tradeoff(self.files.tradeoff_rows(), self.run_dir / "tradeoff.png",
                             f"{self.run_dir.name}: {self.recipe.relufy.activation} + {self.recipe.regularizer.type}")
        if plot is not None:
            self.wandb.log_image("tradeoff_plot", plot, step=self.step)
        self.wandb.finish()
        sparsity = final.get("sparsity", 0.0)
        near = f", near-zero {final['near_zero']:.1%}" if "near_zero" in final else ""
        print(f"sparsetune: done at step {self.step}: held-out perplexity {final['perplexity']:.2f}, "
              f"activation sparsity {sparsity:.1%}{near}; checkpoint {ckpt}; "
              f"export with: sparsetune export {self.run_dir} --out {self.run_dir}/export", flush=True)


def train(recipe: Recipe, overwrite: bool = False, resume: bool | str | None = None,
          command: str = "sparsetune train RECIPE") -> dict:
    """Run a recipe to the end (or to a preemption); returns the last held-out evaluation."""
    trainer = Trainer(recipe, overwrite=overwrite, resume=resume, command=command)
    try:
        return trainer.run()
    finally:
        trainer.close()
