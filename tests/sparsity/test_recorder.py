import torch

from sparsetune.sparsity.recorder import ActivationRecorder
from sparsetune.sparsity.regularizers import get_regularizer

l1, hoyer = get_regularizer("l1"), get_regularizer("hoyer")


def test_sparsity_counts_only_real_tokens():
    a = torch.tensor([[[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]]])  # 1 x 3 tokens x 4
    mask = torch.tensor([[1, 1, 0]])  # the last token is padding (all zeros: must not count)
    rec = ActivationRecorder(num_layers=1, regularizer=None, near_zero_threshold=None)
    rec.open(mask)
    rec.record(0, a, None)
    rec.close()
    rec.record(0, torch.zeros(1, 3, 4), None)  # closed (e.g. checkpoint recompute): ignored
    s = rec.reset_stats().summary()
    assert s["sparsity"] == (2 + 3) / 8
    assert s["per_layer"] == [5 / 8]


def test_near_zero_sparsity_is_reported_separately():
    a = torch.tensor([[[1e-4, -5e-4, 0.5, -0.7]]])
    rec = ActivationRecorder(1, None, near_zero_threshold=1e-3)
    rec.open(None)
    rec.record(0, a, None)
    s = rec.reset_stats().summary()
    assert s["sparsity"] == 0.0 and s["near_zero"] == 0.5 and s["near_zero_threshold"] == 1e-3


def test_regularizer_values_follow_their_formulas():
    a = torch.tensor([[[1.0, -2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]]])
    assert l1(a).item() == (4 / 4 + 3 / 4) / 2
    # hoyer per token: (sum|a|)^2 / sum a^2 / n
    t1 = (1 + 2 + 1) ** 2 / (1 + 4 + 1) / 4
    t2 = 3**2 / 9 / 4
    assert abs(hoyer(a).item() - (t1 + t2) / 2) < 1e-6
    mask = torch.tensor([[1, 0]])
    assert l1(a, mask).item() == 1.0
    assert abs(hoyer(a, mask).item() - t1) < 1e-6


def test_recorder_collects_regularizer_with_gradient_once_per_forward():
    a = torch.tensor([[[1.0, -1.0, 0.0, 2.0]]], requires_grad=True)
    rec = ActivationRecorder(2, l1, None)
    rec.open(None)
    rec.record(0, a, None)
    rec.record(1, a * 0, None)
    rec.close()
    loss = rec.regularizer_loss()
    assert loss.item() == (1.0 + 0.0) / 2
    loss.backward()
    torch.testing.assert_close(a.grad, torch.sign(a.detach()) / 4 / 2)
