"""Batch-1 decode kernels and end-to-end sparse generation."""

from __future__ import annotations

import pytest
import torch

from sparsetune.dynamic.kernels import DecodeWeights
from sparsetune.dynamic.sparse_decode import decode_benchmark, mlp_mode, _Timer
from sparsetune.predictors.bank import PredictorBank
from sparsetune.recipe.schema import PredictorSection, RelufySection
from sparsetune.surgery.activations import build_activation
from sparsetune.surgery.relufy import relufy
from tests.tiny_models import tiny_model


def masked_reference(w: DecodeWeights, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    a = w.act_fn(w.w_gate @ x, w.w_up @ x)
    keep = torch.zeros_like(a)
    keep[idx] = 1.0
    return w.w_down_t.t() @ (a * keep)


@pytest.mark.parametrize("activation", ["relu", "silu", "drelu", "relu2", "fatrelu"])
@pytest.mark.parametrize("kernel", ["fused", "gather"])
def test_decode_kernels_compute_exactly_the_kept_neurons(activation, kernel):
    gen = torch.Generator().manual_seed(0)
    d, m = 48, 160
    act = build_activation(RelufySection(activation=activation, threshold=0.1)).elementwise()
    w = DecodeWeights(torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen),
                      torch.randn(d, m, generator=gen), act)
    x = torch.randn(d, generator=gen)
    for keep in (m, 40, 1):
        idx = torch.randperm(m, generator=gen)[:keep].sort().values
        out = getattr(w, kernel)(x, idx)
        ref = masked_reference(w, x, idx)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert torch.allclose(getattr(w, kernel)(x, torch.arange(m)), w.dense(x), rtol=1e-4, atol=1e-3)


def test_sparse_generation_with_everything_kept_decodes_the_dense_tokens_and_fewer_kept_is_counted():
    model = tiny_model("llama", seed=0)
    relufy(model, RelufySection(activation="relu"))
    cfg = model.config
    bank = PredictorBank(PredictorSection(enabled=True, rank=8), cfg.hidden_size, cfg.intermediate_size,
                         cfg.num_hidden_layers, cfg.num_attention_heads, exact_zeros=True)
    for p in bank.neurons.parameters():  # logits 0 -> sigmoid 0.5 >= threshold 0.5: every neuron kept
        torch.nn.init.zeros_(p)
    prompt = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    result = decode_benchmark(model, bank, prompt, new_tokens=10)
    assert result["sparse"]["neurons_kept"] == 1.0
    assert result["sparse"]["tokens"] == result["dense"]["tokens"]
    assert result["greedy_tokens_matching_dense"] == 1.0
    assert 0 < result["dense"]["mlp_share"] < 1 and result["dense"]["tokens_per_s"] > 0

    # A real (random) predictor keeps a part of the neurons, and the single-token calls go through the kernel.
    torch.manual_seed(0)
    for p in bank.neurons.parameters():
        torch.nn.init.normal_(p, std=0.5)
    timer = _Timer()
    with mlp_mode(model, bank, timer), torch.no_grad():
        model(input_ids=prompt[:, :1])
    assert 0 < timer.kept < timer.total
