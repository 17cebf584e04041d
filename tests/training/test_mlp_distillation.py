"""Layer-wise MLP distillation (`distill.mlp_weight`): every sparse MLP pulled toward the original dense SiLU MLP on
the same input, inside the training forward."""


import pytest
import torch

from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.models.lora import with_peft
from sparsetune.recipe.loading import load_recipe
from sparsetune.sparsity.recorder import attach_recorder
from sparsetune.surgery.relufy import relufy
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.training.components.base import Setup, StepContext
from sparsetune.training.components.distillation import Distillation, normalized_mse
from tests.e2e_helpers import preempt_at, train_logs, train_tiny
from tests.tiny_models import tiny_model


class _Engine:  # the DDP / single-process placement of a frozen model, on CPU
    @staticmethod
    def prepare_teacher(model):
        return model

    @staticmethod
    def place_references(modules):
        return [m.requires_grad_(False) for m in modules]


def built(*overrides: str, gradient_checkpointing: bool = False, perturb: bool = False):
    """(component, model, recorder) set up as the trainer does: components around surgery, LoRA, then prepare."""
    recipe = load_recipe("quickstart", ["output_dir=/tmp/unused", "distill.weight=0", "distill.mlp_weight=1.0",
                                        *overrides])
    model = tiny_model("llama", vocab_size=128).train()
    component = Distillation.build(recipe)
    setup = Setup(recipe=recipe, model=model, engine=_Engine())
    component.before_surgery(setup)
    mlps = relufy(model, recipe.relufy)
    setup.recorder = attach_recorder(mlps, None, 1e-3)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    component.after_surgery(setup)
    model = with_peft(model, recipe.peft)
    if perturb:  # a fine-tuned student: its weights are no longer the original ones
        with torch.no_grad():
            for mlp in sparse_mlps(model):
                for p in mlp.projections():
                    p.weight.add_(0.02 * torch.randn_like(p.weight))
    setup.model = model
    component.after_prepare(setup)
    return component, model, setup.recorder


def training_forward(component, model, recorder, ids):
    """One micro-batch as Trainer._loss_step runs it: (outputs, {term name: LossTerm})."""
    component.begin_micro(0)
    recorder.open(None)
    out = model(input_ids=ids, labels=ids)
    recorder.close()
    return out, {t.name: t for t in component.loss_terms(StepContext(model, out, {"input_ids": ids}))}


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("extra", [[], ["peft.method=lora", "peft.lora.r=4"]], ids=["full", "lora"])
def test_unchanged_silu_model_has_zero_mlp_loss(extra):
    component, model, recorder = built("relufy.activation=silu", *extra)
    _, terms = training_forward(component, model, recorder, IDS)
    assert set(terms) == {"mlp_distill_loss"}
    assert terms["mlp_distill_loss"].value.item() < 1e-10


def test_relu_surgery_gives_a_positive_loss_with_gradient():
    component, model, recorder = built()
    out, terms = training_forward(component, model, recorder, IDS)
    term = terms["mlp_distill_loss"]
    assert term.value.item() > 1e-3 and term.added.requires_grad
    term.added.backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in sparse_mlps(model)[0].projections())


def test_only_the_training_forward_is_measured():
    component, model, recorder = built()
    with torch.no_grad():
        model(input_ids=IDS)  # an evaluation or a teacher pass: not armed
    assert component.mlp_targets.terms == []
    _, terms = training_forward(component, model, recorder, IDS)
    assert len(component.mlp_targets.terms) == 0 and terms["mlp_distill_loss"].value > 0


def test_targets_are_the_original_weights_not_the_trained_ones():
    original = tiny_model("llama", vocab_size=128)
    component, model, _ = built(perturb=True)
    ref, dtype = component.mlp_targets.references[1]
    student = sparse_mlps(model)[1]
    assert type(ref) is type(original.model.layers[1].mlp) and dtype == torch.float32  # the dense SiLU MLP
    assert torch.equal(ref.gate_proj.weight, original.model.layers[1].mlp.gate_proj.weight)
    assert not torch.equal(ref.gate_proj.weight, student.projections()[0].weight)
    assert not any(p.requires_grad for r, _ in component.mlp_targets.references.values() for p in r.parameters())


def test_teacher_weights_are_reused_and_frozen_students_share_their_own():
    component, model, _ = built("distill.weight=0.5")
    assert component.teacher is not None and component.mlp_copies is None
    assert component.mlp_targets.references[0][0] is component.teacher.model.layers[0].mlp  # no second copy

    component, model, _ = built("train.freeze_model=true", "predictor.enabled=true", "relufy.activation=silu")
    assert component.teacher is None and component.mlp_copies is None
    reference = component.mlp_targets.references[0][0].__self__  # the dense computation over the student's own
    assert reference.projections()[0] is sparse_mlps(model)[0].projections()[0]

    component, model, _ = built("peft.method=lora", "peft.lora.r=4")
    base = sparse_mlps(model)[0].projections()[0].get_base_layer()
    assert component.mlp_targets.references[0][0].__self__.projections()[0] is base  # adapters left out, no copy


def test_normalized_mse_counts_real_tokens_only():
    dense = torch.ones(1, 3, 4)
    student = dense.clone()
    student[0, 2] = 100.0  # a padding position
    mask = torch.tensor([[True, True, False]])
    assert normalized_mse(student, dense, mask).item() == 0.0
    assert normalized_mse(2 * dense, dense).item() == pytest.approx(1.0)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    grads = {}
    for gc in (False, True):
        component, model, recorder = built(gradient_checkpointing=gc)
        out, terms = training_forward(component, model, recorder, IDS)
        (out.loss + terms["mlp_distill_loss"].added).backward()
        grads[gc] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


def _assert_logged(run, mlp_weight: float, distill_weight: float = 0.0):
    logs = train_logs(run)
    assert logs and all(m["train/mlp_distill_loss"] > 0 for m in logs)
    assert ("train/distill_loss" in logs[0]) == (distill_weight > 0)
    m = logs[0]
    expected = (m["train/lm_loss"] + m["train/reg_coef"] * m["train/reg_loss"]
                + distill_weight * m.get("train/distill_loss", 0.0) + mlp_weight * m["train/mlp_distill_loss"])
    assert m["train/loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("extra", [[], ["distill.weight=0.5", "peft.method=lora", "peft.lora.r=4"]],
                         ids=["full", "lora_with_logit_distillation"])
def test_training_logs_the_mlp_distillation_term(tiny_model_dirs, tmp_path, extra):
    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=2", "train.log_every=1", "train.eval_every=0",
                      "wandb.mode=disabled", "distill.mlp_weight=2.0", *extra) == 0
    _assert_logged(run, 2.0, 0.5 if extra else 0.0)


@pytest.mark.e2e
def test_resume_is_exact(tiny_model_dirs, tmp_path, monkeypatch):
    """The targets of a resumed run are the original weights (a copy taken from model.path), not the resumed ones."""
    from safetensors.torch import load_file

    args = ["train.max_steps=4", "train.log_every=1", "train.eval_every=0", "wandb.mode=disabled",
            "distill.mlp_weight=1.0", "train.lr=1e-2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train_tiny(tiny_model_dirs["llama"], straight, *args) == 0
    with monkeypatch.context() as patch:
        preempt_at(patch, 2)
        assert train_tiny(tiny_model_dirs["llama"], stopped, *args) == 0
    assert train_tiny(tiny_model_dirs["llama"], stopped, *args, "--resume") == 0
    a, b = ({m["step"]: m["train/mlp_distill_loss"] for m in train_logs(r)} for r in (straight, stopped))
    assert sorted(b) == [1, 2, 3, 4] and a == b  # exact
    wa, wb = (load_file(CheckpointStore(r).latest_complete() / "model" / "model.safetensors")
              for r in (straight, stopped))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
