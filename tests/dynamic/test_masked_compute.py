import pytest
import torch

from sparsetune.activations import build_activation
from sparsetune.dynamic.head_skipping import head_skipping
from sparsetune.dynamic.masked_mlp import gathered_mlp
from sparsetune.recipe.schema import relufy_config
from sparsetune.surgery.relufy import relufy
from sparsetune.surgery.structure import decoder_layers
from tests.tiny_models import tiny_model


def _proj(d_in, d_out, bias):
    lin = torch.nn.Linear(d_in, d_out, bias=bias)
    torch.nn.init.normal_(lin.weight, std=0.2)
    if bias:
        torch.nn.init.normal_(lin.bias, std=0.2)
    return lin


@pytest.mark.parametrize("activation", ["relu", "drelu", "silu", "fatrelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_gathered_mlp_equals_dense_when_nothing_is_dropped_and_oracle_when_masks_are_exact(activation, bias):
    torch.manual_seed(0)
    g, u, d = _proj(16, 40, bias), _proj(16, 40, bias), _proj(40, 16, bias)
    act = build_activation(
        relufy_config(activation=activation, **({'threshold': 0.1} if activation == 'fatrelu' else {})))
    x = torch.randn(3, 7, 16)
    a = act(g(x), u(x))
    dense = d(a)
    keep_all = torch.ones(3, 7, 40, dtype=torch.bool)
    torch.testing.assert_close(gathered_mlp(x, keep_all, g, u, d, act), dense, rtol=1e-5, atol=1e-5)
    exact = a != 0  # exact masks: only truly active neurons are computed
    torch.testing.assert_close(gathered_mlp(x, exact, g, u, d, act), dense, rtol=1e-5, atol=1e-5)
    # a mask that drops active neurons changes the result exactly by their contribution
    drop = exact & (torch.rand_like(a) < 0.5)
    expected = d(a * drop)
    torch.testing.assert_close(gathered_mlp(x, drop, g, u, d, act), expected, rtol=1e-5, atol=1e-5)


def test_topk_gathers_with_its_elementwise_silu():
    torch.manual_seed(1)
    g, u, d = _proj(8, 24, False), _proj(8, 24, False), _proj(24, 8, False)
    act = build_activation(relufy_config(activation="topk", top_k_fraction=0.25))
    x = torch.randn(5, 8)
    a = act(g(x), u(x))
    torch.testing.assert_close(gathered_mlp(x, a != 0, g, u, d, act.elementwise()), d(a), rtol=1e-5, atol=1e-5)


def _set_head_masks(model, masks):
    for layer, mask in zip(decoder_layers(model), masks):
        layer.self_attn.sparsetune_head_mask = mask


def test_head_skipping_kv_written_equals_dense_without_skips_and_kv_skipped_loses_information():
    model = tiny_model("llama")
    relufy(model, relufy_config(activation="relu"))
    ids = torch.randint(0, 512, (2, 12))
    heads = model.config.num_attention_heads
    with torch.no_grad():
        dense = model(ids).logits
        all_on = [torch.ones(2, 12, heads, dtype=torch.bool)] * model.config.num_hidden_layers
        for mode in ("kv_written", "kv_skipped"):
            _set_head_masks(model, all_on)
            with head_skipping(model, mode):
                torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)
        torch.manual_seed(3)
        some_off = [torch.rand(2, 12, heads) > 0.4 for _ in range(model.config.num_hidden_layers)]
        _set_head_masks(model, some_off)
        with head_skipping(model, "kv_written"):
            written = model(ids).logits
        _set_head_masks(model, some_off)
        with head_skipping(model, "kv_skipped"):
            skipped = model(ids).logits
    # the first token has no earlier keys, so both modes agree there; later tokens lose the unwritten KV
    torch.testing.assert_close(written[:, 0], skipped[:, 0], rtol=1e-5, atol=1e-5)
    assert (written[:, 1:] - skipped[:, 1:]).abs().max() > 1e-3
    assert (written - dense).abs().max() > 1e-3


def test_gqa_kv_entries_are_skipped_per_kv_head():
    """Query heads 0 and 1 share KV head 0 (tiny model: 4 query heads, 2 KV heads). Dropping head 0 alone keeps
    the KV entry (head 1 needs it), so kv_skipped equals kv_written; dropping both skips it."""
    from sparsetune.dynamic.head_skipping import kv_written_mask

    mask = torch.tensor([[[False, True, True, True], [False, False, True, False]]])  # [B=1, T=2, H=4]
    assert kv_written_mask(mask, 2).tolist() == [[[True, True, True, True], [False, False, True, True]]]
    model = tiny_model("llama")
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    relufy(model, relufy_config(activation="relu"))
    ids = torch.randint(0, 512, (2, 12))
    layers = model.config.num_hidden_layers

    def run(mask, mode):
        _set_head_masks(model, [mask] * layers)
        with torch.no_grad(), head_skipping(model, mode):
            return model(ids).logits

    alone = torch.ones(2, 12, 4, dtype=torch.bool)
    alone[:, :, 0] = False  # head 0 dropped everywhere, head 1 of its group runs
    torch.testing.assert_close(run(alone, "kv_skipped"), run(alone, "kv_written"), rtol=1e-5, atol=1e-5)
    both = torch.ones(2, 12, 4, dtype=torch.bool)
    both[:, 3, :2] = False  # the whole group dropped at token 3: its KV entry is gone for later tokens
    written, skipped = run(both, "kv_written"), run(both, "kv_skipped")
    torch.testing.assert_close(written[:, :4], skipped[:, :4], rtol=1e-5, atol=1e-5)
    assert (written[:, 4:] - skipped[:, 4:]).abs().max() > 1e-4


def test_masked_compute_of_a_lora_model_includes_its_adapters():
    """The dynamic evaluation of a LoRA run computes with base weight + adapter delta (what the model computes),
    not the base weights alone."""
    from peft import LoraConfig, get_peft_model

    from sparsetune.evaluation.dynamic import KeptFraction, mlp_override
    from sparsetune.surgery.sparse_mlp import sparse_mlps

    model = tiny_model("llama")
    relufy(model, relufy_config(activation="relu"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # trained adapters: B is no longer zero
    model.eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    every = lambda mlp, x: torch.ones(*x.shape[:-1], mlp.projections()[0].out_features, dtype=torch.bool)  # noqa: E731
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with mlp_override(model, every, KeptFraction()):
            masked = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert len(sparse_mlps(model)) == 2
    assert not torch.allclose(dense, base, atol=1e-3)  # the adapters change the model
    torch.testing.assert_close(masked, dense, rtol=1e-4, atol=1e-4)
