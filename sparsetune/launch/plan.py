"""What a launch will hold per rank, from the model's config alone (no weights): `sparsetune validate RECIPE --launch
PRESET --num-processes N [--device-memory GiB]`.

The model is built on the meta device (accelerate's `init_empty_weights`, as `accelerate estimate-memory` does), so
every count is the real model's: tied embeddings once, each decoder layer, each LoRA target. Each part of the model
state then follows what the engine does with it, as sparsetune builds the engines (training/engines.py):

  ddp            everything replicated; DDP's gradient buckets are a second copy of the gradients
                 (gradient_as_bucket_view is off)
  zero2          gradients and optimizer sharded over the ranks, parameters replicated
  zero3          parameters, gradients and optimizer sharded; a layer gathered at a time for its compute
  zero3_offload  as zero3, with the parameter partitions and everything of the optimizer in host memory
  fsdp           (FSDP2 fully_shard per decoder layer + root) parameters, gradients and optimizer sharded

Dtypes: DDP and FSDP2 train in model.dtype (AdamW's moments take the parameter's dtype, no fp32 master copy;
mixed precision is autocast); DeepSpeed casts the model to bf16 / fp16 under mixed precision and keeps an fp32
master copy of its partition (it clones the partition to fp32 in every mode), fp32 moments and, in 16-bit, an fp32
gradient partition. peft keeps LoRA adapters in fp32 (autocast_adapter_dtype). Predictors are fp32 and replicated
with their own AdamW. Under DeepSpeed sparsetune's AdamW is torch's fused one, which updates in place: the per-tensor
one would add two temporaries the size of the rank's whole flat partition at each step (training/optim.py). The
teacher, the layer-wise MLP references and a frozen model are placed as the engine places a teacher: whole per rank
under ddp / zero2, sharded under zero3 / fsdp.

The engines' own estimators are printed beside this breakdown as a cross-check (DeepSpeed's
`estimate_zero{2,3}_model_states_mem_needs`, accelerate's `estimate_training_usage`); they assume a plain full
fine-tune and know nothing of a teacher, references, predictors or LoRA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sparsetune.errors import SparsetuneError
from sparsetune.launch.presets import Preset
from sparsetune.recipe.schema import Recipe

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a model, read from its config on the meta device."""

    params: int              # unique parameters (tied embeddings once)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int              # hidden size of the keys (and of the values): kv heads x head dim
    layer_params: int        # the largest decoder layer
    mlp_params: int          # one decoder layer's MLP (gate, up, down)
    root_params: int         # outside the decoder layers: embeddings, final norm, an untied lm_head
    largest_module: int      # the largest module's own parameters (DeepSpeed's "largest layer")
    lora_params: int = 0     # the adapters peft would add for the recipe's peft.lora
    accelerate_bytes: int = 0  # accelerate's calculate_maximum_sizes total, at float32


def read_config(recipe: Recipe, model_config: str | None = None):
    """The model's transformers config: `model_config` (a config.json or its folder) or model.path's, without
    weights. A hub id offline or a missing file is one line that names --model-config."""
    from transformers import AutoConfig

    if model_config is not None:
        path = Path(model_config)
        if not path.exists():
            raise SparsetuneError(f"--model-config {model_config}: no such file or folder")
        try:
            if path.is_file():
                import json

                data = json.loads(path.read_text())
                return AutoConfig.for_model(data.pop("model_type"), **data)
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise SparsetuneError(f"--model-config {model_config}: not a transformers config ({exc})") from None
    from sparsetune.sources.loading import resolve_model_path

    try:
        _, location = resolve_model_path(recipe.model.path)
        return AutoConfig.from_pretrained(location, revision=recipe.model.revision,
                                          trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError, SparsetuneError) as exc:
        raise SparsetuneError(f"cannot read the config of model.path {recipe.model.path} "
                              f"({str(exc).splitlines()[0][:160]}); pass --model-config PATH/config.json") from None


def model_shape(config, recipe: Recipe) -> ModelShape:
    """Counts from the model built on the meta device (no memory, no weights)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModelForCausalLM

    from sparsetune.surgery.structure import decoder_layers, decoder_mlps

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 trust_remote_code=recipe.model.trust_remote_code)
    unique = {id(p): p.numel() for p in model.parameters()}
    layers = decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    lora = 0
    if recipe.peft.method == "lora":
        targets = set(recipe.peft.lora.target_modules)
        lora = sum(recipe.peft.lora.r * (m.in_features + m.out_features) for name, m in layers.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        params=sum(unique.values()), layers=len(layers), hidden=config.hidden_size,
        intermediate=config.intermediate_size, vocab=config.vocab_size,
        kv_dim=getattr(config, "num_key_value_heads", heads) * head_dim,
        layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        mlp_params=sum(p.numel() for p in decoder_mlps(model)[0].parameters()),
        root_params=sum(n for i, n in unique.items() if i not in in_layers),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        lora_params=lora, accelerate_bytes=int(calculate_maximum_sizes(model)[0]))


def predictor_params(recipe: Recipe, shape: ModelShape, num_heads: int) -> int:
    """The predictor bank's parameters (predictors/networks.py: Linear(d -> r, no bias) -> Linear(r -> m))."""
    p = recipe.predictor
    if not p.enabled:
        return 0
    n = shape.layers - 1 if p.lookahead else shape.layers
    ranks = list(p.layer_ranks) if p.layer_ranks is not None else [p.rank] * n
    neurons = sum(shape.hidden * r + r * shape.intermediate + (shape.intermediate if p.output_bias else 0)
                  for r in ranks)
    heads = shape.layers * (shape.hidden * p.head_rank + p.head_rank * num_heads + num_heads) if p.heads else 0
    return neurons + heads


@dataclass
class Part:
    name: str
    device: float            # bytes per rank on the accelerator (or on the CPU, for a CPU run)
    host: float = 0.0        # bytes per rank in host memory (zero3_offload)
    rule: str = ""


@dataclass
class Plan:
    preset: Preset
    processes: int           # in all (machines x processes per machine)
    per_machine: int
    shape: ModelShape
    precision: str           # what the plan assumed: bf16 / fp16 / no
    parts: list[Part] = field(default_factory=list)        # model state
    transient: list[Part] = field(default_factory=list)    # gathered parameters, activations
    assumptions: list[str] = field(default_factory=list)
    cross_checks: list[str] = field(default_factory=list)

    @property
    def model_state(self) -> float:
        return sum(p.device for p in self.parts)

    @property
    def total(self) -> float:
        return self.model_state + sum(p.device for p in self.transient)

    @property
    def host(self) -> float:
        return sum(p.host for p in self.parts + self.transient)


def _g(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def plan_memory(recipe: Recipe, preset: Preset, processes: int, shape: ModelShape, num_heads: int,
                on_gpu: bool = True, machines: int = 1) -> Plan:
    """Per-rank bytes of each part of the run under `preset` on `processes` processes per machine."""
    mp = recipe.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if on_gpu else "no"
    world = processes * machines
    deepspeed = preset.strategy == "deepspeed"
    stage = preset.zero_stage or 0
    model_b = DTYPE_BYTES[recipe.model.dtype]
    param_b = 2 if deepspeed and mp in ("bf16", "fp16") else model_b  # DeepSpeed casts the model to 16 bits
    shards_params, shards_state = preset.shards_parameters, preset.shards_parameters or stage >= 2
    offload = preset.offload
    plan = Plan(preset, world, processes, shape, mp)

    def div(shard: bool) -> tuple[int, str]:
        return (world, f" / {world}") if shard else (1, "")

    def add(name: str, elements: float, nbytes: float, shard: bool, on_host: bool = False, why: str = "") -> None:
        if elements <= 0:
            return
        d, text = div(shard)
        size = elements * nbytes / d
        rule = f"{nbytes:g} B x {_g(elements)}{text}" + (f" ({why})" if why else "")
        plan.parts.append(Part(name, 0.0 if on_host else size, size if on_host else 0.0, rule))

    frozen_model = recipe.train.freeze_model
    lora = recipe.peft.method == "lora"
    if frozen_model:
        trainable, trainable_b, frozen = 0, param_b, shape.params
    elif lora:
        trainable, trainable_b, frozen = shape.lora_params, (param_b if deepspeed else 4), shape.params
    else:
        trainable, trainable_b, frozen = shape.params, param_b, 0
    frozen_shard = shards_params  # a frozen model is placed as a teacher: sharded by the engines that shard
    add("parameters" if not lora else "LoRA adapters", trainable, trainable_b, shards_params, offload and deepspeed)
    add("frozen base (LoRA)" if lora else "frozen model (train.freeze_model)", frozen, param_b, frozen_shard,
        offload and deepspeed)
    if trainable:
        add("gradients", trainable, trainable_b, shards_state, offload, "reduce-scattered" if shards_state else "")
        if preset.strategy == "ddp":
            add("DDP gradient buckets", trainable, trainable_b, False, why="gradient_as_bucket_view off")
        if deepspeed and param_b < 4:
            add("fp32 gradient partition", trainable, 4, True, offload, "DeepSpeed's optimizer step")
        moment_b = 4 if deepspeed else trainable_b
        add("AdamW moments (2 states)", 2 * trainable, moment_b, shards_state, offload)
        if deepspeed:
            add("fp32 master weights", trainable, 4, True, offload, "DeepSpeed's partition")
    d = recipe.distill
    teacher = d.weight > 0 and not lora and not frozen_model
    if teacher:
        add("teacher (distill.weight)", shape.params, param_b, shards_params, offload and deepspeed)
    elif d.weight > 0:
        plan.assumptions.append("teacher: the LoRA student itself with adapters off (no copy)")
    if d.mlp_weight > 0:
        if teacher:
            plan.assumptions.append("layer-wise MLP references: the teacher's own MLPs (no copy)")
        elif lora or frozen_model:
            plan.assumptions.append("layer-wise MLP references: the student's frozen base MLPs (no copy)")
        else:
            add("MLP references (distill.mlp_weight)", shape.layers * shape.mlp_params, param_b, shards_params,
                offload and deepspeed, "pre-surgery copies")
    n_pred = predictor_params(recipe, shape, num_heads)
    add("predictors (weights, grads, AdamW)", n_pred, 16, False, why="fp32, replicated")

    # gathered for compute: a sharded engine holds full parameters of the unit it computes (and the next, prefetched)
    if preset.strategy == "fsdp":
        n = shape.root_params + 2 * shape.layer_params
        plan.transient.append(Part("gathered parameters", n * param_b, 0.0,
                                   f"{param_b} B x {_g(n)} (the root unit: embeddings + head, kept for the "
                                   "backward; a decoder layer and the next one, prefetched)"))
    elif shards_params:
        n = 2 * max(shape.largest_module, shape.mlp_params)
        plan.transient.append(Part("gathered parameters", n * param_b, 0.0,
                                   f"{param_b} B x {_g(n)} (two of the largest ZeRO-3 module: an MLP leaf or the "
                                   "embeddings, computing and prefetched)"))
    act_b = 2 if mp in ("bf16", "fp16") else model_b
    t = recipe.train
    tokens = t.micro_batch_size * recipe.data.seq_len
    per_layer = 10 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate  # values kept per token
    if t.gradient_checkpointing:
        acts = tokens * (shape.layers * shape.hidden + per_layer) * act_b
        how = f"checkpointing: each layer's input ({shape.layers} x {shape.hidden}) + one layer recomputed"
    else:
        acts = tokens * shape.layers * per_layer * act_b
        how = f"{shape.layers} layers x (10h + 2kv + 4i = {per_layer:,}) values"
    logits_b = act_b + 8 + ((act_b + 8) if d.weight > 0 else 0)
    logits = tokens * shape.vocab * logits_b
    plan.transient.append(Part("activations (estimate)", acts, 0.0, f"{act_b} B x {tokens:,} tokens x {how}"))
    teacher_logits = "; the teacher's logits and log-softmax" if d.weight > 0 else ""
    plan.transient.append(Part("logits", logits, 0.0, f"{logits_b} B x {tokens:,} tokens x vocab {shape.vocab:,} "
                               f"(logits, the fp32 loss and its gradient{teacher_logits})"))
    plan.assumptions += [
        f"activations: micro-batch {t.micro_batch_size} x seq_len {recipe.data.seq_len}, hidden {shape.hidden}, "
        f"intermediate {shape.intermediate}, {shape.layers} layers, gradient checkpointing "
        f"{'on' if t.gradient_checkpointing else 'off'}, {'bf16/fp16' if act_b == 2 else 'fp32'} activations, "
        "SDPA attention (no seq x seq scores kept); a Llama block keeps about 10h + 2kv + 4i values per token; an "
        "estimate (about +-30%), not a measurement",
        f"mixed precision: {mp}" + (" (train.mixed_precision auto on a bf16 GPU)"
                                    if recipe.train.mixed_precision == "auto" else ""),
        "not counted: the CUDA context and kernels' workspaces (~0.5-1 GiB per GPU), NCCL buffers, the caching "
        "allocator's fragmentation, DeepSpeed's bucket buffers (reduce/allgather bucket sizes)",
    ]
    plan.cross_checks = _engine_estimates(preset, shape, processes, machines, mp)
    return plan


def _engine_estimates(preset: Preset, shape: ModelShape, processes: int, machines: int, mp: str) -> list[str]:
    """The engines' own estimators for a plain full fine-tune of the same parameter count."""
    n = shape.params
    if preset.strategy == "deepspeed":
        import torch

        if not torch.cuda.is_available():  # DeepSpeed would warn that it falls back to its CPU accelerator
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if (preset.zero_stage or 0) >= 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                n, shape.largest_module, num_gpus_per_node=processes, num_nodes=machines, cpu_offload=preset.offload,
                cpu_offload_params=preset.offload, zero_init=True, additional_buffer_factor=1.5)
            name = "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            cpu, gpu = estimate_zero2_model_states_mem_needs(
                n, num_gpus_per_node=processes, num_nodes=machines, cpu_offload=False, additional_buffer_factor=1.5)
            name = "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs"
        init = ", zero_init" if (preset.zero_stage or 0) >= 3 else ""
        return [f"{name} (16-bit params, full fine-tune{init}, buffer factor 1.5): {gpu / GIB:.2f} GiB per GPU; "
                f"host per node {cpu / GIB:.2f} GiB ({'the offloaded state' if preset.offload else 'to load'})"]
    from accelerate.commands.estimate import estimate_training_usage

    usage = estimate_training_usage(shape.accelerate_bytes, "float32" if mp == "no" else "bfloat16")
    peak = max(usage.values())
    line = (f"accelerate.commands.estimate.estimate_training_usage (`accelerate estimate-memory`, one process, Adam, "
            f"batch 1, largest of its parts): {peak / GIB:.2f} GiB")
    if preset.shards_parameters:
        line += f"; / {processes * machines} ranks for a full shard: {peak / (processes * machines) / GIB:.2f} GiB"
    return [line]


def format_plan(plan: Plan, device_memory_gib: float | None = None, label: str = "") -> str:
    """The printed plan: one line per part, the total and whether it fits."""
    s = plan.shape
    lines = [f"plan{(' for ' + label) if label else ''}: --launch {plan.preset.name} on {plan.processes} process(es)"
             f"{f' ({plan.per_machine} per machine)' if plan.processes != plan.per_machine else ''}; model "
             f"{_g(s.params)} parameters, {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, "
             f"vocab {s.vocab}" + (f", LoRA adapters {_g(s.lora_params)}" if s.lora_params else ""),
             f"  {'per rank':<40}{'device GiB':>11}{'host GiB':>10}  how"]

    def row(name: str, device: float, host: float, rule: str = "") -> str:
        host_text = f"{host / GIB:>10.2f}" if host else f"{'-':>10}"
        return f"  {name:<40}{device / GIB:>11.2f}{host_text}  {rule}".rstrip()

    lines += [row(p.name, p.device, p.host, p.rule) for p in plan.parts]
    lines.append(row("= model state", plan.model_state, sum(p.host for p in plan.parts)))
    lines += [row(p.name, p.device, p.host, p.rule) for p in plan.transient]
    lines.append(row("= total", plan.total, plan.host))
    if plan.host:
        lines.append(f"  host memory per machine: {plan.host * plan.per_machine / GIB:.1f} GiB "
                     f"({plan.per_machine} ranks x {plan.host / GIB:.2f} GiB, pinned)")
    if device_memory_gib is not None:
        used = plan.total / GIB / device_memory_gib
        verdict = "fits" if used <= 1 else "does NOT fit"
        lines.append(f"  {verdict} in {device_memory_gib:g} GiB per device ({used:.0%} of it)")
    lines += [f"  assumes {a}" for a in plan.assumptions]
    lines += [f"  cross-check, {c}" for c in plan.cross_checks]
    return "\n".join(lines)


def plan_for_recipe(recipe: Recipe, preset: Preset, processes: int, model_config: str | None = None,
                    machines: int = 1, on_gpu: bool = True) -> Plan:
    """Read the config (no weights), count, and plan."""
    config = read_config(recipe, model_config)
    shape = model_shape(config, recipe)
    return plan_memory(recipe, preset, processes, shape, config.num_attention_heads, on_gpu=on_gpu,
                       machines=machines)
