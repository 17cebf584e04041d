import pytest
import torch

from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import relufy_config
from sparsetune.surgery.relufy import relufy, restore_hf_mlps
from sparsetune.surgery.sparse_mlp import SparseMLP
from tests.tiny_models import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_silu_surgery_keeps_outputs_and_state_dict_names(family):
    model = tiny_model(family)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        before = model(x).logits
    keys_before = set(model.state_dict())
    mlps = relufy(model, relufy_config(activation="silu"))
    assert len(mlps) == model.config.num_hidden_layers
    assert all(isinstance(layer.mlp, SparseMLP) for layer in model.model.layers)
    assert set(model.state_dict()) == keys_before
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_relu_surgery_changes_the_mlp_math_and_restore_gives_plain_modules(family):
    model = tiny_model(family)
    x = torch.randint(0, 512, (1, 8))
    mlp_in = torch.randn(1, 8, model.config.hidden_size)
    plain = model.model.layers[0].mlp
    g, u, d = plain.gate_proj, plain.up_proj, plain.down_proj
    relufy(model, relufy_config(activation="relu"))
    with torch.no_grad():
        torch.testing.assert_close(model.model.layers[0].mlp(mlp_in), d(torch.relu(g(mlp_in)) * u(mlp_in)))
        relu_logits = model(x).logits
    model.config.hidden_act = "relu"
    restore_hf_mlps(model)
    assert type(model.model.layers[0].mlp).__name__.endswith("MLP")
    assert not any(isinstance(m, SparseMLP) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, relu_logits)


def test_model_without_swiglu_mlp_is_refused_with_its_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(SparsetuneError,
                       match=r"model type 'gpt2' .*supported model types: llama, mistral, qwen2, qwen3"):
        relufy(model, relufy_config(activation="relu"))
