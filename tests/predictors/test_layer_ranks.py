"""predictor.layer_ranks: one rank per neuron predictor, counted in the budget, refused in one line when the count
does not match the model (the GGUF's per-layer shapes: tests/export/test_powerinfer.py)."""

import pytest

from sparsetune.predictors.bank import PredictorBank
from sparsetune.recipe.schema import PredictorSection
from tests.e2e_helpers import one_error, train_tiny


def test_each_predictor_has_its_own_rank_and_the_budget_counts_them():
    d, m, layers = 16, 40, 3
    ranks = [2, 6, 4]
    bank = PredictorBank(PredictorSection(enabled=True, layer_ranks=ranks), d, m, layers, 4, exact_zeros=True)
    assert [p.down.weight.shape[0] for p in bank.neurons] == ranks == bank.layer_ranks
    params = sum(d * r + r * m + m for r in ranks)  # Linear(d -> r, no bias) -> Linear(r -> m) with its bias
    assert bank.neuron_param_fraction() == pytest.approx(params / (3 * d * m * layers))
    # lookahead: one predictor fewer, so one rank fewer
    ahead = PredictorBank(PredictorSection(enabled=True, layer_ranks=ranks[:2], lookahead=True), d, m, layers, 4,
                          exact_zeros=True)
    assert [p.down.weight.shape[0] for p in ahead.neurons] == ranks[:2]


@pytest.mark.parametrize("ranks, why", [("[4]", r"holds 1 ranks; this model needs one per neuron predictor: 2"),
                                        ("[4,0]", r"predictor\.layer_ranks")])
def test_a_wrong_list_of_ranks_is_one_line(tiny_model_dirs, tmp_path, capsys, ranks, why):
    code = train_tiny(tiny_model_dirs["llama"], tmp_path / "run", "predictor.enabled=true",
                      f"predictor.layer_ranks={ranks}", "train.max_steps=1", "wandb.mode=disabled")
    one_error(capsys, code, why)
