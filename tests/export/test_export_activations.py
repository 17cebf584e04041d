"""Each activation's export loads three ways: sparsetune's loader, plain transformers (equal logits where the math
allows a plain folder; else it refuses instead of running the dense model) and transformers with the folder's own
code (`trust_remote_code=True`, equal logits)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsetune
from sparsetune.checkpoint.store import CheckpointStore
from sparsetune.cli import main
from sparsetune.models.build import SparseModel
from tests.e2e_helpers import train_tiny

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "family, overrides, exact, hidden_act",
    [
        ("llama", ["relufy.activation=relu2"], True, "relu2"),
        ("llama", ["relufy.activation=shifted_relu", "relufy.shift=0.05"], True, "relu"),
        ("mistral", ["relufy.activation=shifted_relu", "relufy.shift=0.05"], False, "relu"),
        ("llama", ["relufy.activation=drelu"], False, "relu"),
        ("qwen3", ["relufy.activation=topk", "relufy.top_k_fraction=0.25"], False, "silu"),
        ("qwen2", ["relufy.activation=fatrelu", "relufy.threshold=0.02"], False, "relu"),
        ("llama", ["relufy.activation=cats", "relufy.target_sparsity=0.6", "relufy.calibration_batches=2"], False,
         "silu"),
        ("llama", ["relufy.activation=relu"], True, "relu"),
        ("llama", ["relufy.activation=output_aware", "relufy.target_sparsity=0.6", "regularizer.type=none",
                   "relufy.calibration_batches=2", "thresholds.calibration_batches=2"], False, "silu"),
        ("llama", ["relufy.activation=output_aware", "relufy.form=relu", "relufy.score=gate",
                   "relufy.target_sparsity=0.6", "regularizer.type=none", "relufy.calibration_batches=2",
                   "thresholds.calibration_batches=2", "compensation.enabled=true"], False, "relu"),
        ("mistral", ["relufy.activation=output_aware", "relufy.target_sparsity=0.6", "regularizer.type=none",
                     "relufy.calibration_batches=2", "thresholds.calibration_batches=2", "compensation.enabled=true"],
         False, "silu"),
    ],
)
def test_activation_export(tiny_model_dirs, tmp_path, family, overrides, exact, hidden_act):
    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs[family], run, "train.max_steps=2", "train.eval_every=0",
                      "wandb.mode=disabled", *overrides) == 0
    trained = SparseModel.from_source(CheckpointStore(run).latest_complete()).model
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--no-eval"]) == 0
    spec = json.loads((out / "sparsetune.json").read_text())
    assert spec["plain_transformers_exact"] is exact
    ids = torch.randint(0, trained.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = trained.eval()(ids).logits
        via_sparsetune = sparsetune.load_sparse_model(out).eval()(ids).logits
    torch.testing.assert_close(via_sparsetune, expected, rtol=1e-5, atol=1e-5)
    if exact:
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        assert plain.config.hidden_act == hidden_act
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert not (out / "modeling_sparsetune.py").exists()
    else:
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == f"sparsetune_{family}" and config["hidden_act"] == hidden_act
        with pytest.raises(ValueError, match="trust_remote_code"):  # refused, never the dense model
            AutoModelForCausalLM.from_pretrained(out)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert type(remote).__name__ == "SparsetuneForCausalLM"
        with torch.no_grad():
            torch.testing.assert_close(remote(ids).logits, expected, rtol=1e-5, atol=1e-5)
        card = (out / "README.md").read_text()
        assert "Plain transformers cannot express" in card or "compensation" in card
        assert "trust_remote_code=True" in card
    if "shifted_relu" in overrides[0] and exact:
        assert plain.config.mlp_bias is True
        torch.testing.assert_close(plain.model.layers[0].mlp.gate_proj.bias,
                                   torch.full_like(plain.model.layers[0].mlp.gate_proj.bias, -0.05))
