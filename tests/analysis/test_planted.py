"""The analyses on tiny models whose activation structure is planted, so the right answer is known exactly."""

import pytest
import torch

from sparsetune.analysis.collect import collect
from sparsetune.analysis.command import analyze
from sparsetune.evaluation.dynamic import PromptMasks, prompt_eval
from sparsetune.recipe.schema import relufy_config
from sparsetune.sparsity.cett import cett, threshold_for_cett
from sparsetune.surgery.relufy import relufy
from sparsetune.surgery.sparse_mlp import sparse_mlps
from sparsetune.surgery.structure import decoder_layers
from tests.tiny_models import tiny_model

CPU = torch.device("cpu")


def _batches(seed: int = 0, sequences: int = 4, tokens: int = 32) -> list[dict]:
    """Random ids from a small vocabulary, so every id recurs in several sequences (history pairs exist)."""
    ids = torch.randint(3, 40, (sequences, tokens), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2].clone()} for i in range(0, sequences, 2)]


def _relu(model):
    relufy(model, relufy_config(activation="relu"))
    return model


def token_fixed_model():
    """Every attention output projection (o_proj) is zero, so attention adds nothing to the residual stream: layer
    0's MLP input is the normed token embedding, its output a function of it, and by induction every layer's MLP
    input depends on the token id alone. Whatever the definition of active (a per-token function of the
    activation), a token's active set is then fixed by its id: history dependence exactly 0."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight.zero_()
    return _relu(model)


def constant_mask_model():
    """Gate weights zero and gate biases +1 on the first half of the neurons, -1 on the rest: ReLU(gate) is 1 or 0
    whatever the input, so a = ReLU(gate) * up is nonzero exactly on the first half (up(x) is never exactly 0 for
    these random weights) for every token of every layer. Attention is left as it is (outputs still depend on the
    context). Active sets never change: inertia 1 at every distance and for random pairs, and a prompt's top half
    of neurons is that set, so prompt masks compute exactly what dense does."""
    model = tiny_model("llama", mlp_bias=True)
    with torch.no_grad():
        for mlp in (layer.mlp for layer in decoder_layers(model)):
            mlp.gate_proj.weight.zero_()
            half = mlp.gate_proj.bias.shape[0] // 2
            mlp.gate_proj.bias[:half] = 1.0
            mlp.gate_proj.bias[half:] = -1.0
    return _relu(model)


@pytest.fixture(scope="module")
def token_fixed():
    model = token_fixed_model()
    batches = _batches()
    return model, batches, analyze(collect(model, batches, CPU))


@pytest.fixture(scope="module")
def constant():
    model = constant_mask_model()
    batches = _batches()
    return model, batches, analyze(collect(model, batches, CPU))


def test_active_set_fixed_by_token_id_gives_no_history_dependence(token_fixed):
    _, _, result = token_fixed
    assert result["pairs"]["same_token"] > 20
    for row in result["layers"]:
        assert row["same_token"] == 1.0 and row["history_dependence"] == 0.0
        assert row["token_explained"] == pytest.approx(1.0)  # all of the overlap beyond chance is the token id
        assert row["inertia_consecutive"] < 0.9  # different tokens do activate different neurons


def test_constant_mask_gives_inertia_one_and_full_prompt_coverage(constant):
    _, _, result = constant
    for row in result["layers"]:
        assert row["active_fraction"] == 0.5
        assert row["inertia_consecutive"] == 1.0 and row["inertia_random"] == 1.0
        assert row["history_dependence"] == 0.0 and row["token_explained"] is None  # nothing to explain
    assert all(v == 1.0 for row in result["inertia_by_distance"]["jaccard"] for v in row)
    kept = result["prompt_overlap"]["kept_fractions"]
    for kind in ("count", "mass"):
        for row in result["prompt_overlap"][kind]:
            assert all(v == pytest.approx(1.0) for k, v in zip(kept, row) if k >= 0.5)


def test_prompt_masks_on_a_constant_mask_compute_exactly_dense(constant):
    model, batches, _ = constant
    out = prompt_eval(model, batches, CPU, PromptMasks(0.5, keep=0.5), exact_zeros=True)
    assert out["prompt"]["sparsity"] == pytest.approx(0.5)  # half the neurons skipped on every continuation token
    assert out["prompt"]["perplexity"] == pytest.approx(out["continuation_dense"]["perplexity"], rel=1e-5)
    assert out["continuation_oracle"]["sparsity"] == pytest.approx(0.5)


def test_prompt_masks_keeping_every_neuron_are_dense_and_keeping_fewer_costs():
    model = _relu(tiny_model("llama"))
    batches = _batches(seed=1)
    full = prompt_eval(model, batches, CPU, PromptMasks(0.5, keep=1.0), exact_zeros=True)
    assert full["prompt"]["perplexity"] == pytest.approx(full["continuation_dense"]["perplexity"], rel=1e-5)
    assert full["prompt"]["sparsity"] == 0.0
    part = prompt_eval(model, batches, CPU, PromptMasks(0.5, mass=0.8), exact_zeros=True)
    assert 0 < part["prompt"]["sparsity"] < 1
    # the best per-token masks at the same skipped fraction are the reference on the same tokens
    assert part["continuation_best"]["sparsity"] >= part["prompt"]["sparsity"] - 1e-6


def test_prompt_masks_select_the_top_fraction_or_the_fewest_reaching_the_mass():
    mass = torch.tensor([[4.0, 0.0, 3.0, 2.0, 1.0]])
    assert PromptMasks(keep=0.4).select(mass).tolist() == [[True, False, True, False, False]]
    assert PromptMasks(keep=None, mass=0.7).select(mass).tolist() == [[True, False, True, False, False]]  # 7/10
    assert PromptMasks(keep=None, mass=1.0).select(mass).tolist() == [[True, False, True, True, True]]  # never 0
    assert PromptMasks(fraction=0.5).prompt_len(8) == 4 and PromptMasks(fraction=0.99).prompt_len(8) == 7


def test_cett_at_threshold_zero_is_zero(constant):
    torch.manual_seed(0)
    silu = torch.nn.functional.silu(torch.randn(64, 128)) * torch.randn(64, 128)  # no exact zeros
    w = torch.randn(32, 128)
    assert torch.equal(cett(silu, w, 0.0), torch.zeros(64))
    assert threshold_for_cett(silu, w, 0.0)[2] == 0.0  # nothing can be dropped for free
    model, batches, _ = constant
    mlp = sparse_mlps(model)[0]
    gate, up, down = mlp.projections()
    x = torch.randn(64, gate.in_features)
    relu = mlp.activation(gate(x), up(x)).detach()
    assert torch.equal(cett(relu, down.weight, 0.0), torch.zeros(64))
    # dropping anything but the exact zeros costs error: no more than the exact-zero share at budget 0
    assert threshold_for_cett(relu, down.weight, 0.0)[2] <= float((relu == 0).float().mean()) + 1e-9
