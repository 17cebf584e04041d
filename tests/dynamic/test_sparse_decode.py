"""Batch-1 decode kernels and end-to-end sparse generation."""

from __future__ import annotations

import shutil

import pytest
import torch

from sparsetune.activations import build_activation
from sparsetune.dynamic.kernels import DecodeWeights, kernel_in_use
from sparsetune.dynamic.sparse_decode import _kernel_record, _Timer, decode_benchmark, mlp_mode
from sparsetune.predictors.bank import PredictorBank
from sparsetune.recipe.schema import PredictorSection, relufy_config
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
    act = build_activation(
        relufy_config(activation=activation, **({'threshold': 0.1} if activation == 'fatrelu' else {}))).elementwise()
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
    relufy(model, relufy_config(activation="relu"))
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
    # The speeds come with the kernel that produced them (the fused C++ kernel wherever a compiler exists).
    assert result["kernel"] == kernel_in_use("cpu", torch.float32, "relu")
    assert set(result["kernel"]) == {"kernel", "reason", "build_flags", "cpu_key"}
    if shutil.which("c++"):
        assert result["kernel"]["kernel"] == "fused" and result["kernel"]["cpu_key"]

    # A real (random) predictor keeps a part of the neurons, and the single-token calls go through the kernel.
    torch.manual_seed(0)
    for p in bank.neurons.parameters():
        torch.nn.init.normal_(p, std=0.5)
    timer = _Timer()
    with mlp_mode(model, bank, timer), torch.no_grad():
        model(input_ids=prompt[:, :1])
    assert 0 < timer.kept < timer.total


def test_the_decode_kernel_record_names_the_fallback_for_models_the_fused_kernel_cannot_run():
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation="fatrelu", threshold=0.1))
    assert _kernel_record(model) == {"kernel": "gather", "reason": "activation 'fatrelu' has no fused implementation",
                                     "build_flags": [], "cpu_key": None}
    model = tiny_model("llama", seed=0)
    relufy(model, relufy_config(activation="relu"))
    model.to(torch.bfloat16)
    assert _kernel_record(model)["reason"] == "the fused kernel is float32-only (dtype torch.bfloat16)"
