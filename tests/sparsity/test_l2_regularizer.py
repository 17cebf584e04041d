"""The l2 regularizer, added as one file (sparsetune/sparsity/regularizers/l2.py): the proof that a regularizer
joins a run through the component protocol without a trainer edit."""

import pytest
import torch

from sparsetune.recipe.schema import RegularizerSection
from sparsetune.sparsity.regularizers import get_regularizer, regularizer_names
from tests.e2e_helpers import train_logs, train_tiny


def test_l2_is_discovered_and_follows_its_formula():
    assert "l2" in regularizer_names() and RegularizerSection(type="l2").type == "l2"
    l2 = get_regularizer("l2")
    a = torch.tensor([[[1.0, -2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]]])
    assert l2(a).item() == pytest.approx(((1 + 4 + 0 + 1) / 4 + 9 / 4) / 2)
    assert l2(a, torch.tensor([[1, 0]])).item() == pytest.approx(6 / 4)  # padding tokens do not count


@pytest.mark.e2e
def test_a_run_with_l2_adds_it_to_the_loss(tiny_model_dirs, tmp_path):
    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, "regularizer.type=l2", "regularizer.schedule=constant",
                      "regularizer.coef=0.5", "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
                      "wandb.mode=disabled") == 0
    logs = train_logs(run)
    assert [m["step"] for m in logs] == [1, 2, 3]
    for m in logs:
        assert m["train/reg_loss"] > 0 and m["train/reg_coef"] == 0.5
        assert m["train/loss"] == pytest.approx(m["train/lm_loss"] + 0.5 * m["train/reg_loss"], rel=1e-4)
