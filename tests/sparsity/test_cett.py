"""CETT: the relative MLP-output error of dropping small contributions, and the effective sparsity at a budget."""

from __future__ import annotations

import pytest
import torch

from sparsetune.recipe.schema import relufy_config
from sparsetune.sparsity.cett import TokenSampler, cett, cett_report, threshold_for_cett
from sparsetune.surgery.relufy import relufy
from sparsetune.surgery.sparse_mlp import patched_mlps, sparse_mlps
from tests.tiny_models import tiny_model


def sampled_activations(activation: str, batches: int = 4, **keys) -> tuple[torch.nn.Module, TokenSampler]:
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation=activation, **keys))
    sampler = TokenSampler(max_tokens=512, per_batch=256)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), patched_mlps(model, sink=sampler):
        for _ in range(batches):
            model(input_ids=torch.randint(0, model.config.vocab_size, (4, 32), generator=g))
    return model, sampler


def test_cett_at_threshold_zero_is_zero_for_a_relu_model_and_exact_zeros_are_free():
    model, sampler = sampled_activations("relu")
    for mlp in sparse_mlps(model):
        a, w = sampler.tokens(mlp.layer_idx), mlp.projections()[2].weight
        assert a.shape == (512, model.config.intermediate_size)
        assert torch.equal(cett(a, w, 0.0), torch.zeros(len(a)))
        # dropping every exact zero (any threshold below the smallest real contribution) costs nothing either
        assert float(cett(a, w, 1e-12).max()) == 0.0
        zeros = float((a == 0).float().mean())
        assert 0.3 < zeros < 0.7
        assert threshold_for_cett(a, w, 0.01)[2] >= zeros  # the effective sparsity counts the exact zeros and more
        assert threshold_for_cett(a, w, 0.2)[2] > threshold_for_cett(a, w, 0.01)[2]


@pytest.mark.parametrize("budget", [0.01, 0.2])
def test_threshold_for_cett_is_the_highest_within_the_budget(budget):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(256, 96, generator=g) * torch.sigmoid(torch.randn(256, 96, generator=g))
    w = torch.randn(32, 96, generator=g)
    t, err, sparsity = threshold_for_cett(a, w, budget, resolution=1e-3)
    assert err <= budget and float(cett(a, w, t).mean()) == pytest.approx(err, abs=1e-6)
    s = a.abs() * w.norm(dim=0)
    assert sparsity == pytest.approx(float((s < t).float().mean()))
    # one resolution step of the values further is over the budget
    above = torch.quantile(s.flatten(), min(1.0, sparsity + 2e-3)).item()
    assert float(cett(a, w, above).mean()) > budget


def test_a_gate_rule_drops_by_its_values_not_by_contribution():
    g = torch.Generator().manual_seed(2)
    gate, up = torch.randn(128, 64, generator=g), torch.randn(128, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    a = torch.relu(gate) * up
    t, err, sparsity = threshold_for_cett(a, w, 0.1, values=gate, floor=0.0, resolution=1e-4)
    assert t >= 0 and err <= 0.1
    assert float(cett(a, w, t, values=gate).mean()) == pytest.approx(err, abs=1e-6)
    assert sparsity == pytest.approx(float((gate < t).float().mean()))
    # a budget nothing fits: what is left is ReLU itself (CETT 0, only the negative gates dropped)
    t, err, sparsity = threshold_for_cett(a, w, 1e-9, values=gate, floor=0.0)
    assert err == 0.0 and sparsity == float((gate < 0).float().mean()) and t <= float(gate[gate > 0].min())


def test_cett_report_per_budget_and_layer():
    model, sampler = sampled_activations("topk", top_k_fraction=0.5)
    report = cett_report(sampler, sparse_mlps(model))
    assert set(report["cett_sparsity"]) == {"0.01", "0.2"} and report["cett_tokens_per_layer"] == 512
    for budget in ("0.01", "0.2"):
        per_layer = report["cett_sparsity_per_layer"][budget]
        assert len(per_layer) == model.config.num_hidden_layers and all(0 <= v <= 1 for v in per_layer)
        assert report["cett_sparsity"][budget] == pytest.approx(sum(per_layer) / len(per_layer))
    # top-k keeps half: those zeros are free, so even the tight budget reaches at least them
    assert report["cett_sparsity"]["0.01"] >= 0.5
    assert report["cett_sparsity"]["0.2"] > report["cett_sparsity"]["0.01"]


def test_sampler_keeps_real_tokens_only_and_stops_at_its_limit():
    sampler = TokenSampler(max_tokens=10, per_batch=6)
    a = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    sampler.observe_mlp(0, a, None, mask)
    rows = sampler.tokens(0)
    assert rows.shape == (5, 3) and set(rows[:, 0].tolist()) == {0.0, 3.0, 6.0, 15.0, 18.0}
    for _ in range(3):
        sampler.observe_mlp(0, a, None, None)
    assert sampler.counts[0] == 10 and len(sampler.tokens(0)) == 10
