import math

import pytest
import torch
import torch.nn.functional as F

from sparsetune.activations import build_activation
from sparsetune.recipe.schema import relufy_config


@pytest.fixture
def gu():
    torch.manual_seed(0)
    return torch.randn(3, 5, 40), torch.randn(3, 5, 40)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"activation": "silu"}, lambda g, u: g * torch.sigmoid(g) * u),
        ({"activation": "relu"}, lambda g, u: torch.clamp(g, min=0) * u),
        ({"activation": "shifted_relu", "shift": 0.5}, lambda g, u: torch.clamp(g - 0.5, min=0) * u),
        ({"activation": "fatrelu", "threshold": 0.3}, lambda g, u: g * (g >= 0.3).float() * u),
        ({"activation": "drelu"}, lambda g, u: torch.clamp(g, min=0) * torch.clamp(u, min=0)),
        ({"activation": "relu2"}, lambda g, u: torch.clamp(g, min=0) ** 2 * u),
    ],
)
def test_activation_math(gu, cfg, expected):
    g, u = gu
    act = build_activation(relufy_config(cfg))
    torch.testing.assert_close(act(g, u), expected(g, u))


def test_topk_keeps_k_largest_per_token_and_passes_gradient_straight_through(gu):
    g, u = gu
    g.requires_grad_(True)
    act = build_activation(relufy_config(activation="topk", top_k_fraction=0.25))
    out = act(g, u)
    dense = F.silu(g) * u
    k = math.ceil(0.25 * 40)
    assert ((out != 0).sum(-1) == k).all()
    kth = dense.detach().abs().topk(k, dim=-1).values[..., -1:]
    kept = out != 0
    assert (dense.detach().abs()[kept] >= kth.expand_as(dense)[kept]).all()
    torch.testing.assert_close(out[kept], dense.detach()[kept])
    # straight-through: the gradient equals that of the dense activation
    (out * 2).sum().backward()
    g2 = g.detach().clone().requires_grad_(True)
    (2 * F.silu(g2) * u).sum().backward()
    torch.testing.assert_close(g.grad, g2.grad)


def test_exported_spec_rebuilds_the_same_activation(gu):
    g, u = gu
    for cfg in ({"activation": "fatrelu", "threshold": 0.2}, {"activation": "topk", "top_k_fraction": 0.3},
                {"activation": "shifted_relu", "shift": 0.7}):
        act = build_activation(relufy_config(cfg))
        again = build_activation(act.spec())
        torch.testing.assert_close(act(g, u), again(g, u))
