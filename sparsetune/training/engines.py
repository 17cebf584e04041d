"""How the model is distributed: plain/DDP (accelerate), DeepSpeed ZeRO (accelerate), FSDP2 (torch `fully_shard`).

The trainer asks its engine to wrap the model and optimizer, run backward, clip, step, and save/restore what
only the engine knows (DeepSpeed's partitioned optimizer, FSDP's sharded optimizer). Full weights for
checkpoints and exports are always gathered (`full_state_dict`), so an export never holds empty tensors.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from sparsetune.recipe.schema import Recipe
from sparsetune.training.optim import build_optimizer, build_scheduler


def _launched_with(flag: str) -> bool:
    """Whether `accelerate launch` set ACCELERATE_USE_<flag> for this process (readable before any Accelerator)."""
    return os.environ.get(f"ACCELERATE_USE_{flag}", "false").lower() == "true"


def fsdp_requested() -> bool:
    (  # one docstring, wrapped by implicit concatenation
        "`accelerate launch` with an FSDP config sets this (also on CPU, where accelerate itself would fall back "
        "to DDP).")
    return _launched_with("FSDP")


def skip_cpu_deepspeed_shm_build() -> None:
    """Under a DeepSpeed launch without a GPU, tell DeepSpeed not to JIT-build its shared-memory comm op.

    DeepSpeed's torch backend builds `deepspeed_shm_comm` (a C++ extension, ~25-50 s of compiling, again for every
    new venv path) when it opens its process group on the CPU accelerator. The op serves only DeepSpeed's
    `inference_all_reduce`; ZeRO training reduces through torch.distributed (gloo here), so the build buys nothing.
    `deepspeed.ops.__compatible_ops__` is the dict DeepSpeed reads to decide ("edits to it persist", its comment).
    """
    if not _launched_with("DEEPSPEED") or torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _fix_cpu_deepspeed_state(accelerator: Accelerator) -> None:
    """On a machine without GPUs, accelerate starts DeepSpeed's gloo process group but records a single
    process (rank 0 everywhere). Put the real rank and world size into accelerate's shared state so that
    is_main_process, reduce() and the data sharding are right."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    state = accelerator.state
    if state.num_processes == dist.get_world_size():
        return
    from accelerate.state import AcceleratorState, PartialState

    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["num_processes"] = dist.get_world_size()
        shared["process_index"] = dist.get_rank()
        shared["local_process_index"] = int(os.environ.get("LOCAL_RANK", dist.get_rank()))


class Engine:
    """Single process or DDP through accelerate."""

    name = "ddp"
    shards_parameters = False
    trains_model = True  # False in the predictor-only phase (FrozenModel)
    flat_optimizer_partitions = False  # the optimizer steps one flat tensor per group (DeepSpeed): fused AdamW

    def __init__(self, accelerator: Accelerator, recipe: Recipe):
        self.accelerator = accelerator
        self.recipe = recipe
        self.lora = recipe.peft.method == "lora"

    @staticmethod
    def strategy_of(accelerator: Accelerator) -> str:
        """How the launcher asked this process to distribute: deepspeed, fsdp or ddp."""
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            return "deepspeed"
        return "fsdp" if fsdp_requested() and accelerator.num_processes > 1 else "ddp"

    @staticmethod
    def create(accelerator: Accelerator, recipe: Recipe) -> Engine:
        """The engine for this process. A predictor-only run (train.freeze_model) is the FrozenModel phase from the
        start: the model whole on every rank under DDP, sharded as the launcher's engine shards a teacher."""
        strategy = Engine.strategy_of(accelerator)
        engine = {"deepspeed": DeepSpeedZero, "fsdp": FSDP2, "ddp": Engine}[strategy](accelerator, recipe)
        if not recipe.train.freeze_model:
            return engine
        return FrozenModel(accelerator, recipe, placed_by=engine if engine.shards_parameters else None,
                           after_training=False)

    def describe(self) -> str:
        return "DDP" if self.accelerator.num_processes > 1 else "single process"

    def prepare(self, model) -> tuple:
        """(wrapped model, optimizer, LR scheduler). The scheduler is built on the engine's own torch optimizer
        and stepped by hand once per optimizer step (not prepared), so the LR at step n is the same whatever the
        number of processes."""
        optimizer = build_optimizer(model.parameters(), self.recipe.train, fused=self.flat_optimizer_partitions)
        model, wrapped = self._wrap(model, optimizer)
        return model, wrapped, build_scheduler(optimizer, self.recipe.train)

    def _wrap(self, model, optimizer) -> tuple:
        return self.accelerator.prepare(model, optimizer)

    def prepare_teacher(self, model):
        """The distillation teacher (a model used only for forward passes), placed like the student:
        a full copy per rank here; sharded by the engines that shard parameters."""
        return model.to(self.accelerator.device)

    def forward_context(self):
        """Around the training forward: a graph is built for the model (not in the predictor-only phase)."""
        return contextlib.nullcontext()

    def sync_context(self, model, last: bool):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        self.accelerator.backward(loss / accum)

    def clip(self, model, max_norm: float):
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def step(self, optimizer, scheduler, apply: bool) -> float:
        """One optimizer step (skipped when not `apply`: a non-finite step changes no weight); the LR schedule
        moves on either way. Returns the LR the step used."""
        lr = scheduler.get_last_lr()[0]
        if apply:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return lr

    def full_state_dict(self, model) -> dict | None:
        """Full (gathered) weights on the main process; every rank must call it."""
        return self.accelerator.get_state_dict(model)

    # ------------------------------------------------------------ checkpoint
    def save_state(self, model, optimizer, folder: Path) -> None:
        """Weights (full, gathered: an export needs no process group) and optimizer state. Every rank calls it;
        the main process writes `model/` (and `optimizer.pt` unless the engine saves its sharded optimizer). LoRA:
        `model/` is the adapter (peft's save_pretrained picks its tensors out of the gathered state dict)."""
        state_dict = self.full_state_dict(model) if self.shards_parameters or not self.lora else None
        if optimizer is not None:
            self.save_sharded_optimizer(model, optimizer, folder)
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(model).save_pretrained(folder / "model", state_dict=state_dict)
            if optimizer is not None and not self.saves_optimizer_itself():
                torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load_state(self, model, optimizer, folder: Path) -> None:
        """Restore what save_state() wrote (every rank)."""
        from sparsetune.checkpoint.resume import load_model_weights
        from sparsetune.checkpoint.state import is_lora_checkpoint, load_torch_state

        if optimizer is not None and self.saves_optimizer_itself():
            self.load_sharded(model, optimizer, folder)  # weights and the sharded optimizer state
            return
        load_model_weights(self.accelerator.unwrap_model(model), folder / "model", is_lora_checkpoint(folder))
        if optimizer is not None:
            optimizer.load_state_dict(load_torch_state(folder / "optimizer.pt"))

    def saves_optimizer_itself(self) -> bool:
        return False

    def save_sharded_optimizer(self, model, optimizer, folder: Path) -> None:
        """Engine-owned optimizer state (all ranks call it)."""

    def load_sharded(self, model, optimizer, folder: Path) -> None:
        """Restore weights and what save_sharded_optimizer() wrote (all ranks)."""

    def local_parameter_count(self, model) -> tuple[int, int]:
        """(parameters held by this rank, parameters of the model)."""
        n = sum(p.numel() for p in model.parameters())
        return n, n

    def place_references(self, modules: list[nn.Module]) -> list[nn.Module]:
        """Frozen modules outside the model that its forward calls, one per decoder layer (layer-wise distillation's
        reference MLPs), placed like the layers they belong to: whole on every rank here; sharded by the engines
        that shard parameters, each gathered by its own forward."""
        return [m.requires_grad_(False).to(self.accelerator.device) for m in modules]


class FrozenModel(Engine):
    """The predictor-only phase: the model runs forward without a graph and is neither optimized nor clipped; only
    the components' own losses (the predictors') are backpropagated, outside any engine (the predictors are
    replicated: their optimizer is their own). Two ways in:

      train.freeze_model      the whole run: the model is never wrapped for training (`prepare` freezes it)
      predictor.only_steps    after train.max_steps: the model stays where the training engine `placed_by` put it,
                              and checkpoints are still that engine's (same files, so resume crosses the phases)
    """

    name = "frozen"
    trains_model = False

    def __init__(self, accelerator: Accelerator, recipe: Recipe, placed_by: Engine | None = None,
                 after_training: bool = True):
        super().__init__(accelerator, recipe)
        self.placed_by = placed_by
        self.after_training = after_training  # False: train.freeze_model (the model is never trained in this run)
        if placed_by is not None:
            self.shards_parameters = placed_by.shards_parameters

    def describe(self) -> str:
        if self.placed_by is None:
            return "model frozen, predictors only" + (", DDP" if self.accelerator.num_processes > 1 else "")
        if self.after_training:
            return f"model frozen, predictors only (after {self.placed_by.describe()})"
        return f"model frozen and sharded as a {self.placed_by.describe()} teacher, predictors only"

    def prepare(self, model) -> tuple:
        """train.freeze_model: the model frozen, placed as the sharding engine places a teacher (FSDP2 per layer,
        a ZeRO-3 inference engine), or whole on every rank; no optimizer, no LR schedule."""
        model.requires_grad_(False)
        if self.placed_by is not None:
            return self.placed_by.prepare_teacher(model), None, None
        return model.to(self.accelerator.device), None, None

    def forward_context(self):
        return torch.no_grad()

    def sync_context(self, model, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        (loss / accum).backward()  # the predictors' loss: no model graph, no engine scaling or partitioning

    def clip(self, model, max_norm: float):
        return None

    def step(self, optimizer, scheduler, apply: bool) -> float:
        return 0.0

    # what is saved and how the model is placed stay the training engine's
    def full_state_dict(self, model) -> dict | None:
        return (self.placed_by or super()).full_state_dict(model)

    def save_state(self, model, optimizer, folder: Path) -> None:
        (self.placed_by or super()).save_state(model, optimizer, folder)

    def load_state(self, model, optimizer, folder: Path) -> None:
        if self.placed_by is not None and not self.after_training:
            # train.freeze_model under sharding: the weights are model.path's, never changed by this run (the
            # base-model part checked on resume that model.path still holds them); nothing else to restore
            return
        (self.placed_by or super()).load_state(model, optimizer, folder)

    def saves_optimizer_itself(self) -> bool:
        return self.placed_by.saves_optimizer_itself() if self.placed_by else False

    def prepare_teacher(self, model):
        return (self.placed_by or super()).prepare_teacher(model)

    def place_references(self, modules: list[nn.Module]) -> list[nn.Module]:
        return (self.placed_by or super()).place_references(modules)

    def local_parameter_count(self, model) -> tuple[int, int]:
        return (self.placed_by or super()).local_parameter_count(model)


class DeepSpeedZero(Engine):
    """DeepSpeed ZeRO 1/2/3 through accelerate. Batch size, accumulation and clipping come from the recipe.
    Checkpoints use DeepSpeed's own save/load (each rank's optimizer partition and fp32 master weights)."""

    name = "deepspeed"
    flat_optimizer_partitions = True

    def __init__(self, accelerator: Accelerator, recipe: Recipe):
        super().__init__(accelerator, recipe)
        _fix_cpu_deepspeed_state(accelerator)
        plugin = accelerator.state.deepspeed_plugin
        t = recipe.train
        cfg = plugin.deepspeed_config
        cfg["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        cfg["gradient_accumulation_steps"] = t.grad_accum_steps
        cfg["gradient_clipping"] = t.max_grad_norm
        cfg["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * accelerator.num_processes
        self.stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
        self.shards_parameters = self.stage >= 3

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage}"

    def _wrap(self, model, optimizer) -> tuple:
        if self.stage >= 3:
            _mlps_as_zero3_leaves(model)
        return super()._wrap(model, optimizer)

    def full_state_dict(self, model) -> dict | None:
        """ZeRO-3: gathered one layer at a time onto the main process, from the training engine or an inference
        engine alike (a train.freeze_model run's model); LoRA: the adapters only (the frozen base stays
        partitioned)."""
        if self.stage >= 3:
            return model._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=self.lora)
        return super().full_state_dict(model)

    def place_references(self, modules: list[nn.Module]) -> list[nn.Module]:
        """ZeRO-3: partitioned in one inference engine of their own, each a ZeRO-3 leaf (its forward gathers all its
        parameters, then frees them)."""
        if self.stage < 3:
            return super().place_references(modules)
        from deepspeed.utils import set_z3_leaf_modules

        holder = nn.ModuleList(modules).requires_grad_(False)
        set_z3_leaf_modules(holder, list({type(m) for m in modules}))
        # no persistent parameters: they would be gathered by a forward of the holder, which never runs one
        self._inference_engine(holder, persistence_threshold=0)
        return modules

    def prepare_teacher(self, model):
        """ZeRO-3: the teacher gets its own inference engine with partitioned parameters (as TRL prepares its
        reference models); ZeRO-1/2 replicate parameters anyway, so a plain copy is what they would hold."""
        if self.stage < 3:
            return super().prepare_teacher(model)
        _mlps_as_zero3_leaves(model)
        return self._inference_engine(model)

    def _inference_engine(self, model, persistence_threshold: int | None = None):
        """A DeepSpeed engine over `model` with ZeRO-3-partitioned parameters and no optimizer."""
        import copy

        import deepspeed

        cfg = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            cfg.pop(key, None)
        cfg["zero_optimization"] = {k: v for k, v in cfg["zero_optimization"].items()
                                    if not k.startswith("offload_optimizer")}
        if persistence_threshold is not None:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()  # DeepSpeedEngine.train() returns None, so not `return engine.eval()`
        return engine

    def sync_context(self, model, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps and steps at the boundary itself.
        self.accelerator.gradient_state._set_sync_gradients(last)
        self.accelerator.backward(loss)

    def clip(self, model, max_norm: float):
        norm = model.get_global_grad_norm()  # DeepSpeed clipped inside its step
        return None if norm is None else float(norm)

    def saves_optimizer_itself(self) -> bool:
        return True

    def save_sharded_optimizer(self, model, optimizer, folder: Path) -> None:
        # LoRA: the frozen base is model.path's (checked by the base-model part), only the adapters are saved
        model.save_checkpoint(str(folder / "deepspeed"), tag="engine", save_latest=False,
                              exclude_frozen_parameters=self.lora)

    def load_sharded(self, model, optimizer, folder: Path) -> None:
        model.load_checkpoint(str(folder / "deepspeed"), tag="engine", load_optimizer_states=True,
                              load_lr_scheduler_states=False, load_module_strict=False)

    def local_parameter_count(self, model) -> tuple[int, int]:
        # ZeRO-3: each parameter's own partition is ds_tensor; ZeRO-1/2 keep full parameters on every rank.
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        return local, total


def _mlps_as_zero3_leaves(model) -> None:
    """ZeRO-3 gathers a module's parameters when that module's own forward starts. An MLP's parameters are read
    directly inside its forward (masked compute, a predictor's down-projection norms, distillation's reference on the
    same projections), so each decoder layer's MLP is a ZeRO-3 leaf: all its parameters, its children's included,
    are gathered for the whole of its forward and backward."""
    from deepspeed.utils import set_z3_leaf_modules

    from sparsetune.surgery.structure import decoder_mlps

    set_z3_leaf_modules(model, list({type(mlp) for mlp in decoder_mlps(model)}))


class FSDP2(Engine):
    """torch FSDP2: `fully_shard` on every decoder layer and on the root. Runs over NCCL or gloo, so the
    same code path is tested on CPU. Optimizer state is saved sharded with torch.distributed.checkpoint."""

    name = "fsdp"
    shards_parameters = True

    def describe(self) -> str:
        return "FSDP2 (fully_shard per decoder layer)"

    def prepare(self, model) -> tuple:
        from torch.distributed.fsdp import fully_shard

        from sparsetune.surgery.structure import decoder_layers

        model.to(self.accelerator.device)
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        optimizer = build_optimizer(model.parameters(), self.recipe.train)  # over the sharded parameters
        return model, optimizer, build_scheduler(optimizer, self.recipe.train)

    def prepare_teacher(self, model):
        """Sharded per decoder layer, and each layer's MLP as a unit of its own: layer-wise distillation calls a
        teacher MLP directly, and its forward gathers (and frees) just that MLP."""
        from torch.distributed.fsdp import fully_shard

        from sparsetune.surgery.sparse_mlp import patched_mlps
        from sparsetune.surgery.structure import decoder_layers, decoder_mlps

        model.to(self.accelerator.device)
        for layer, mlp in zip(decoder_layers(model), decoder_mlps(model)):
            fully_shard(mlp)
            fully_shard(layer)
        fully_shard(model)
        # FSDP2 initializes its units at the root's first forward, and a unit called directly before that would
        # make itself a root: one token through the root now (no activation recorded), so an MLP can be called alone
        with torch.no_grad(), patched_mlps(model, sink=None, override=None):
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.accelerator.device))
        model.reshard()  # the root keeps its parameters gathered after a forward (for a backward): free them
        return model

    def place_references(self, modules: list[nn.Module]) -> list[nn.Module]:
        """Each sharded as a unit of its own: its forward gathers its parameters and frees them after. A unit called
        alone is a root, and FSDP2 keeps a root's parameters gathered after its forward (for a backward, which a
        frozen reference never has): a hook frees them again, or every reference would stay whole on every rank
        after its first forward (measured: +1 GiB per rank at 0.5B, docs/DISTRIBUTED.md)."""
        from torch.distributed.fsdp import fully_shard

        placed = []
        for module in modules:
            unit = fully_shard(module.requires_grad_(False).to(self.accelerator.device))
            unit.register_forward_hook(lambda unit, args, output: unit.reshard())
            placed.append(unit)
        return placed

    def sync_context(self, model, last: bool):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip(self, model, max_norm: float):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_state_dict(self, model) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.accelerator.is_main_process else None

    def saves_optimizer_itself(self) -> bool:
        return True

    def save_sharded_optimizer(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(folder / "fsdp_optimizer"))

    def load_sharded(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from sparsetune.checkpoint.resume import read_weights

        full = read_weights(folder / "model")
        if self.lora:  # peft writes adapter tensors without the adapter's name: put it back for the model's keys
            full = {key: full[key.replace(".default.", ".")] for key in model.state_dict()
                    if key.replace(".default.", ".") in full and ".default." in key}
        elif getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in full:
            full["lm_head.weight"] = full["model.embed_tokens.weight"]
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(folder / "fsdp_optimizer"))
        set_optimizer_state_dict(model, optimizer, state["optimizer"])

    def local_parameter_count(self, model) -> tuple[int, int]:
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        return local, total
