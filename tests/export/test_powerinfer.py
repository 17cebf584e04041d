"""`export --powerinfer`: the GGUF PowerInfer loads (names, shapes, dtypes, metadata its loader reads: see
sparsetune/export/powerinfer_gguf.py for the cited source lines) and the masks PowerInfer computes from it on the
residual stream, equal to sparsetune's on the same tokens. PowerInfer itself is not on the package registries, so
these tests read the file back with the `gguf` package; docs/ENGINES.md has the runs in the engine."""

import contextlib
import json
import os

import numpy as np
import pytest
import torch

from sparsetune.cli import main
from sparsetune.export.powerinfer import engine_mask, global_threshold, powerinfer_layers
from sparsetune.predictors.bank import PredictorBank, load_predictors
from sparsetune.recipe.schema import PredictorSection
from tests.e2e_helpers import one_error, tmpfs, train_tiny


def _bank(**cfg) -> PredictorBank:
    torch.manual_seed(0)
    bank = PredictorBank(PredictorSection(enabled=True, rank=4, **cfg), 16, 40, 3, 4, exact_zeros=True)
    for p in bank.neurons.parameters():
        torch.nn.init.normal_(p)
    return bank


@pytest.mark.parametrize("nonlinearity", ["none", "relu"])
@pytest.mark.parametrize("layer_thresholds", [None, [-0.5, -2.0, -0.1], [0.3, 1.0, 2.5]])
def test_residual_predictors_give_powerinfer_the_same_masks(nonlinearity, layer_thresholds):
    bank = _bank(nonlinearity=nonlinearity, output_bias=False, input="residual")
    bank.layer_thresholds = layer_thresholds
    threshold, layers = powerinfer_layers(bank)
    hidden = 4 if nonlinearity == "relu" else 8  # a linear map as relu(z) - relu(-z): twice the rank
    assert layers[0]["fc1.weight"].shape == (hidden, 16) and layers[0]["fc2.weight"].shape == (40, hidden)
    r = torch.randn(200, 16) * 5
    for layer in range(3):
        ours = bank.neurons[layer](r) >= bank.threshold_for(layer)  # what sparsetune computes on the residual
        assert torch.equal(engine_mask(layers[layer]["fc1.weight"], layers[layer]["fc2.weight"], threshold, r), ours)


def test_mlp_input_predictors_fold_exactly_only_at_threshold_0():
    """f(norm(r)) >= 0 <=> f(w * r) >= 0 (relu is positively homogeneous): fc1 = W1 diag(w), exact."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from sparsetune.errors import SparsetuneError

    bank = _bank(nonlinearity="relu", output_bias=False)  # threshold 0.5 = logit 0
    norms = []
    for _ in range(3):
        norm = LlamaRMSNorm(16, eps=1e-5)
        torch.nn.init.uniform_(norm.weight, 0.2, 2.0)
        norms.append(norm)
    threshold, layers = powerinfer_layers(bank, [n.weight for n in norms])
    r = torch.randn(300, 16) * torch.rand(300, 1) * 20  # per-token scales far apart, as in a real residual stream
    for layer in range(3):
        x = norms[layer](r).detach()
        assert torch.equal(engine_mask(layers[layer]["fc1.weight"], layers[layer]["fc2.weight"], threshold, r),
                           bank.neuron_mask(layer, x))
    bank.layer_thresholds = [-0.5, -1.0, -2.0]  # calibrated: the norm's per-token scale would move the cut
    with pytest.raises(SparsetuneError, match="train them with predictor.input=residual"):
        powerinfer_layers(bank, [n.weight for n in norms])


def test_what_powerinfer_cannot_hold_is_refused():
    from sparsetune.errors import SparsetuneError

    with pytest.raises(SparsetuneError, match="output bias"):
        powerinfer_layers(_bank(input="residual"))
    with pytest.raises(SparsetuneError, match="nonlinearity=gelu"):
        powerinfer_layers(_bank(output_bias=False, nonlinearity="gelu", input="residual"))
    with pytest.raises(SparsetuneError, match="lookahead"):
        powerinfer_layers(_bank(output_bias=False, lookahead=True))
    bank = _bank(output_bias=False, input="residual")
    bank.layer_thresholds = [-1.0, 0.5, 1.0]
    with pytest.raises(SparsetuneError, match="mixed signs"):
        global_threshold(bank)


def test_a_layer_calibrated_at_logit_0_beside_negative_ones_keeps_at_least_its_neurons():
    from sparsetune.export.powerinfer import ZERO_NUDGE

    bank = _bank(output_bias=False, input="residual")
    bank.layer_thresholds = [-1.0, 0.0, -2.0]  # mass-recall calibration capped one layer at sigmoid 0.5
    threshold, scales = global_threshold(bank)
    logits = torch.tensor([-2 * ZERO_NUDGE, -ZERO_NUDGE / 2, 0.0, 0.3])
    kept = scales[1] * logits >= threshold  # PowerInfer's rule on the scaled fc2
    assert kept.tolist() == [False, True, True, True]  # every neuron logit >= 0 keeps, and only a sliver more
    assert (scales[0] * torch.tensor([-1.0, -1.01]) >= threshold).tolist() == [True, False]  # others unchanged


def _rope_hf(q: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """transformers' Llama rope on one head: rotate_half pairs (i, i + d/2)."""
    d = q.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv])
    rot = torch.cat([-q[..., d // 2:], q[..., : d // 2]], dim=-1)
    return q * ang.cos() + rot * ang.sin()


def _rope_ggml(q: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """ggml's rope mode 0 (PowerInfer's llama): adjacent pairs (2i, 2i + 1) rotated by base^(-2i/d)."""
    d = q.shape[-1]
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x0, x1 = q[..., 0::2], q[..., 1::2]
    out = torch.empty_like(q)
    out[..., 0::2] = x0 * theta.cos() - x1 * theta.sin()
    out[..., 1::2] = x0 * theta.sin() + x1 * theta.cos()
    return out


RANKS = [8, 12]  # one rank per layer of the tiny model: PowerInfer reads each layer's from its tensors


@pytest.fixture(scope="module")
def powerinfer_export(tiny_model_dirs, tmp_path_factory):
    """A tiny tied-embedding Llama run with residual predictors calibrated to a mass-recall target, exported."""
    from tests.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("pi")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    base = save_tiny_model(root / "tied", "llama", tokenizer, tie_word_embeddings=True, rope_theta=50000.0)
    run = root / "run"
    assert train_tiny(base, run, "train.max_steps=3", "predictor.enabled=true", f"predictor.layer_ranks={RANKS}",
                      "predictor.output_bias=false", "predictor.input=residual", "predictor.nonlinearity=relu",
                      "predictor.target_mass_recall=0.99", "predictor.calibration_batches=2",
                      "train.eval_every=0", "wandb.mode=disabled") == 0
    out = root / "export"
    assert main(["export", str(run), "--out", str(out), "--no-eval", "--powerinfer"]) == 0
    return base, out


@pytest.mark.e2e
def test_the_gguf_holds_what_powerinfers_loader_reads(powerinfer_export):
    from transformers import AutoConfig

    from sparsetune.export.powerinfer_gguf import GGUF_FILE, header_version, read_gguf, tensor_bytes

    base, out = powerinfer_export
    path = out / GGUF_FILE
    assert path.read_bytes()[:4] == b"PWRI" and header_version(path) == 3
    cfg = AutoConfig.from_pretrained(out)
    d, m, n, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * d // cfg.num_attention_heads
    reader = read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    # ggml dims (llama.cpp:3238-3263 create_tensor calls) are numpy's reversed
    expected = {"token_embd.weight": (d, vocab), "output_norm.weight": (d,), "output.weight": (d, vocab)}
    for i in range(n):
        expected.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (d, d),
                         f"blk.{i}.attn_k.weight": (d, kv), f"blk.{i}.attn_v.weight": (d, kv),
                         f"blk.{i}.attn_output.weight": (d, d), f"blk.{i}.ffn_norm.weight": (d,),
                         f"blk.{i}.ffn_gate.weight": (d, m), f"blk.{i}.ffn_up.weight": (d, m),
                         f"blk.{i}.ffn_down_t.weight": (d, m), f"blk.{i}.fc1.weight": (d, RANKS[i]),
                         f"blk.{i}.fc2.weight": (RANKS[i], m)})  # the rank per layer as the recipe chose
    assert {k: tuple(int(x) for x in t.shape) for k, t in tensors.items()} == expected  # exactly these (llama.cpp:2111)
    for name, t in tensors.items():
        # 1-D norms F32; axpy reads ffn_down_t as F16; the predictors F16 as PowerInfer's converters write them
        want = "F32" if len(expected[name]) == 1 else "F16"
        assert t.tensor_type.name == want, name
    # the predictors' bytes beside the MLP's, from the header alone (what sparsity_report.json carries)
    sizes = tensor_bytes(path)
    assert n == len(RANKS)
    assert sizes["predictor_bytes"] == sum(2 * (d * r + r * m) for r in RANKS) and sizes["predictor_dtypes"] == ["F16"]
    assert sizes["mlp_bytes"] == n * 2 * 3 * d * m
    assert sizes["total_tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert sizes["total_tensor_bytes"] < sizes["file_bytes"] == path.stat().st_size
    # tied embeddings: output.weight is written anyway, equal to the embedding
    assert np.array_equal(tensors["output.weight"].data, tensors["token_embd.weight"].data)
    fields = {f.name: f for f in reader.fields.values()}

    def value(key):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert value("general.architecture") == "llama"
    assert value("llama.rope.freq_base") == pytest.approx(50000.0)  # from rope_parameters, not a default
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert value("llama.block_count") == n and value("llama.feed_forward_length") == m
    assert value("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert value("tokenizer.ggml.model") == "gpt2" and len(value("tokenizer.ggml.tokens")) == vocab
    assert len(value("tokenizer.ggml.merges")) > 0
    report = json.loads((out / "sparsity_report.json").read_text())
    assert value("powerinfer.sparse_threshold") == pytest.approx(report["powerinfer"]["sparse_threshold"])
    # GPU/CPU split solver input (powerinfer-py solver.py:22): activation/activation_{i}.pt, n_ff counts
    counts = [torch.load(out / "activation" / f"activation_{i}.pt", weights_only=True) for i in range(n)]
    tokens = report["powerinfer"]["activation_counts"]["tokens"]
    assert all(c.shape == (m,) and 0 <= int(c.min()) and int(c.max()) <= tokens for c in counts)
    assert sum(int(c.sum()) for c in counts) > 0
    # the neurons are written hot-first, the order recorded beside the file and listed as written by the export
    from sparsetune.export.powerinfer_gguf import NEURON_ORDER_FILE, read_neuron_order

    assert report["powerinfer"]["neuron_order"] == f"hot-first by activation count on {tokens} calibration tokens"
    assert report["powerinfer"]["neuron_order_file"] == NEURON_ORDER_FILE
    assert NEURON_ORDER_FILE in json.loads((out / "sparsetune.json").read_text())["files"]
    order = read_neuron_order(out)
    assert len(order) == n and all(torch.equal(o.sort().values, torch.arange(m)) for o in order)
    card = (out / "README.md").read_text()
    assert "model.powerinfer.gguf" in card and "docs/ENGINES.md" in card


@pytest.mark.e2e
def test_the_dense_path_reference_file_is_plain_gguf(powerinfer_export, tmp_path):
    """scripts/bench_powerinfer.py's speed reference: the same weights for PowerInfer's dense loader
    (llm_load_tensors: `GGUF` magic, `ffn_down`, no predictors, no threshold)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsetune.export.powerinfer_gguf import write_gguf

    _, out = powerinfer_export
    path = write_gguf(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), None, 0.0,
                      tmp_path / "dense.gguf")
    assert path.read_bytes()[:4] == b"GGUF"
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert "blk.0.ffn_down.weight" in names and not {n for n in names if ".fc" in n or "down_t" in n}
    assert "powerinfer.sparse_threshold" not in {f.name for f in reader.fields.values()}


@pytest.mark.e2e
def test_q_k_permutation_makes_ggml_rope_equal_transformers_rope(powerinfer_export):
    from transformers import AutoModelForCausalLM

    from sparsetune.export.powerinfer_gguf import GGUF_FILE, read_gguf

    _, out = powerinfer_export
    model = AutoModelForCausalLM.from_pretrained(out)
    hd = model.config.hidden_size // model.config.num_attention_heads
    w_hf = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    t = {t.name: t for t in read_gguf(out / GGUF_FILE).tensors}["blk.0.attn_q.weight"]
    w_gguf = torch.from_numpy(np.array(t.data, dtype=np.float64)).reshape(w_hf.shape)
    x = torch.randn(w_hf.shape[1], dtype=torch.float64)

    def interleave(v: torch.Tensor) -> torch.Tensor:  # per head, dims (i, i + d/2) -> (2i, 2i + 1)
        return v.reshape(-1, 2, hd // 2).transpose(1, 2).reshape(-1, hd)

    for pos in (0, 3, 17):
        q_hf = _rope_hf((w_hf @ x).reshape(-1, hd), pos, 50000.0)
        q_gg = _rope_ggml((w_gguf @ x).reshape(-1, hd), pos, 50000.0)
        assert torch.allclose(q_gg, interleave(q_hf), atol=1e-2, rtol=1e-2)  # F16 weights in the GGUF


@pytest.mark.e2e
def test_masks_from_the_gguf_equal_sparsetunes_on_the_same_tokens(powerinfer_export, tmp_path):
    """Run the export in sparsetune; on each layer's residual stream, the masks PowerInfer computes from the GGUF's
    fc1/fc2 and sparse_threshold equal those sparsetune's predictors (as `eval --dynamic` applies them) compute:
    exactly with F32 predictors; with the default F16 ones (computed as ggml does: F16 inputs, F32 sums) except on
    neurons whose output lies within F16 rounding of the threshold."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsetune import load_sparse_model
    from sparsetune.evaluation.dynamic import predicted_mask
    from sparsetune.export.powerinfer import f16_margin
    from sparsetune.export.powerinfer_gguf import GGUF_FILE, read_gguf, read_neuron_order, write_gguf
    from sparsetune.surgery.sparse_mlp import patched_mlps

    _, out = powerinfer_export
    model = load_sparse_model(out).eval()
    bank = load_predictors(out).bind(model)
    threshold = float(json.loads((out / "sparsity_report.json").read_text())["powerinfer"]["sparse_threshold"])
    residuals, ours = {}, {}
    choose = predicted_mask(bank)

    def override(mlp, x):
        residuals[mlp.layer_idx] = bank.features(mlp.layer_idx, x).reshape(-1, x.shape[-1])
        ours[mlp.layer_idx] = choose(mlp, x).reshape(-1, mlp.projections()[0].out_features)
        return mlp.dense(x)

    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 48))
    with torch.no_grad(), patched_mlps(model, override=override):
        model(input_ids=ids)
    lm = AutoModelForCausalLM.from_pretrained(out)  # the same export, its predictors written F32
    t_f32, fc_layers = powerinfer_layers(load_predictors(out), [b.post_attention_layernorm.weight
                                                                 for b in lm.model.layers])
    assert t_f32 == threshold
    f32 = write_gguf(lm, AutoTokenizer.from_pretrained(out), fc_layers, threshold, tmp_path / "f32.gguf",
                     predictor_dtype="f32")
    d, m = model.config.hidden_size, model.config.intermediate_size
    kept, differ = [], 0
    # the export's file holds the neurons hot-first (file row r: the model's neuron order[r]); the F32 one written
    # here, without an order, the model's own order: sparsetune's masks are mapped to each file's rows
    hot_first = read_neuron_order(out)
    assert any(not torch.equal(o, torch.arange(m)) for o in hot_first)  # a real permutation on this model
    for path, dtype, order in ((out / GGUF_FILE, np.float16, hot_first), (f32, np.float32, None)):
        tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in read_gguf(path).tensors}
        for i in range(model.config.num_hidden_layers):
            fc1 = tensors[f"blk.{i}.fc1.weight"].reshape(-1, d)
            fc2 = tensors[f"blk.{i}.fc2.weight"].reshape(m, -1)
            assert fc1.dtype == fc2.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype
            theirs = engine_mask(fc1, fc2, threshold, residuals[i])
            mine = ours[i] if order is None else ours[i][:, order[i]]  # column r: the neuron in file row r
            if dtype == np.float32:
                assert torch.equal(theirs, mine), i
                kept.append(theirs.float().mean().item())
                continue
            wrong = theirs != mine
            output = torch.relu(residuals[i] @ fc1.float().t()) @ fc2.float().t()
            assert ((output - threshold).abs()[wrong] <= f16_margin(fc1, fc2, residuals[i])[wrong]).all(), i
            differ += int(wrong.sum())
    assert differ <= 0.01 * len(kept) * residuals[0].shape[0] * m  # a rare near-threshold neuron, if any
    assert 0 < min(kept) and max(kept) < 1  # a real cut, not all-or-nothing


@pytest.mark.e2e
def test_an_activation_powerinfer_cannot_run_is_refused(tiny_model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], run, "train.max_steps=1", "relufy.activation=relu2",
                      "predictor.enabled=true", "predictor.rank=8", "predictor.output_bias=false",
                      "predictor.input=residual", "train.eval_every=0", "wandb.mode=disabled") == 0
    capsys.readouterr()
    one_error(capsys, main(["export", str(run), "--out", str(tmp_path / "x"), "--no-eval", "--powerinfer"]),
              r"--powerinfer: activation 'relu2' cannot run truthfully in PowerInfer's llama path")
    assert not (tmp_path / "x").exists()
    biased = tmp_path / "biased"
    assert train_tiny(tiny_model_dirs["llama"], biased, "train.max_steps=1", "predictor.enabled=true",
                      "predictor.rank=8", "train.eval_every=0", "wandb.mode=disabled") == 0
    capsys.readouterr()
    one_error(capsys, main(["export", str(biased), "--out", str(tmp_path / "x"), "--no-eval", "--powerinfer"]),
              r"predictor.output_bias=false")
    assert not (tmp_path / "x").exists()


@pytest.mark.e2e
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a real tmpfs needs root")
def test_a_full_disk_while_writing_the_gguf_says_no_space_left(powerinfer_export, tmp_path, capsys, monkeypatch):
    """numpy's ndarray.tofile (what the gguf package writes tensors with) reports a short write as
    "3145728 requested and 1258880 written", with no errno; the GGUF's tensors are written with Python's own writes,
    so a full disk is ENOSPC, "No space left on device", and the partial file is removed."""
    import errno

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparsetune.export.targets.powerinfer as target  # the powerinfer export target writes the GGUF
    from sparsetune.export.powerinfer_gguf import write_gguf

    _, out = powerinfer_export
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    _, fc_layers = powerinfer_layers(load_predictors(out), [b.post_attention_layernorm.weight for b in lm.model.layers])
    with tmpfs(tmp_path / "disk", "128k") as disk:  # room for the header (~7 kB), not for the tensors (~230 kB)
        with pytest.raises(OSError) as caught:
            write_gguf(lm, tokenizer, fc_layers, 0.0, disk / "m.gguf")
        assert caught.value.errno == errno.ENOSPC and "No space left on device" in str(caught.value)
        assert caught.value.filename == str(disk / "m.gguf") and not list(disk.iterdir())
    with tmpfs(tmp_path / "disk2", "8m") as disk:  # `export --powerinfer`: the disk fills just before the GGUF
        real = target.write_gguf

        def fill_then_write(*args, **kwargs):
            with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            return real(*args, **kwargs)

        monkeypatch.setattr(target, "write_gguf", fill_then_write)
        capsys.readouterr()
        line = one_error(capsys, main(["export", str(out.parent / "run"), "--out", str(disk / "x"), "--no-eval",
                                       "--powerinfer"]),
                         r"could not write the export .*x: No space left on device \(.*model\.powerinfer\.gguf\)")
        assert "requested and" not in line and not (disk / "x").exists()


def test_predictors_are_f16_unless_f16_cannot_hold_them_and_their_bytes_are_reported(tiny_tokenizer, tmp_path):
    """PowerInfer's converters write fc1/fc2 F16 (convert-hf-to-powerinfer-gguf.py:403-410, convert.py:124-129) and
    its loader checks only their shapes (llama.cpp:2076-2107); a tensor F16 would overflow (a per-layer threshold
    folded into fc2 can scale it up) is written F32, which ggml_mul_mat takes as well."""
    from sparsetune.export.powerinfer_gguf import read_gguf, tensor_bytes, write_gguf
    from tests.tiny_models import tiny_model

    lm = tiny_model("llama", vocab_size=len(tiny_tokenizer), hidden_act="relu")
    d, m, n, r = lm.config.hidden_size, lm.config.intermediate_size, lm.config.num_hidden_layers, 8
    torch.manual_seed(0)
    fc = [{"fc1.weight": torch.randn(r, d), "fc2.weight": torch.randn(m, r)} for _ in range(n)]
    fc[1]["fc2.weight"][0, 0] = 1e6
    sizes = {}
    for dtype in ("f16", "f32"):
        path = write_gguf(lm, tiny_tokenizer, fc, -1.0, tmp_path / f"{dtype}.gguf", predictor_dtype=dtype)
        types = {t.name: t.tensor_type.name for t in read_gguf(path).tensors}
        sizes[dtype] = tensor_bytes(path)
        assert sizes[dtype]["mlp_bytes"] == n * 3 * d * m * 2 == sum(
            t.n_bytes for t in read_gguf(path).tensors if ".ffn_" in t.name and "norm" not in t.name)
        if dtype == "f32":
            assert {types[f"blk.{i}.fc{j}.weight"] for i in range(n) for j in (1, 2)} == {"F32"}
            continue
        assert types["blk.1.fc2.weight"] == "F32"  # 1e6 > 65504
        assert {types[k] for k in ("blk.0.fc1.weight", "blk.0.fc2.weight", "blk.1.fc1.weight")} == {"F16"}
        assert sizes[dtype]["predictor_dtypes"] == ["F16", "F32"]
    assert sizes["f32"]["predictor_bytes"] == n * (r * d + m * r) * 4
    assert sizes["f16"]["predictor_bytes"] == (n * (r * d + m * r) + m * r) * 2
    with pytest.raises(ValueError, match="predictor_dtype"):
        write_gguf(lm, tiny_tokenizer, fc, -1.0, tmp_path / "x.gguf", predictor_dtype="bf16")


def test_hot_first_order_is_a_stable_descending_sort_of_the_counts():
    from sparsetune.export.powerinfer import hot_first_order

    counts = [torch.tensor([3, 5, 5, 0, 3, 9]), torch.zeros(6, dtype=torch.int64)]
    order = hot_first_order(counts)
    assert order[0].tolist() == [5, 1, 2, 0, 4, 3]  # ties (5, 5 and 3, 3) keep their index order
    assert order[1].tolist() == list(range(6)) and order[0].dtype == torch.int64


def _tensors(path) -> dict[str, np.ndarray]:
    from sparsetune.export.powerinfer_gguf import open_gguf

    return {t.name: np.array(t.data).reshape(tuple(int(x) for x in reversed(t.shape))) for t in open_gguf(path).tensors}


@pytest.mark.e2e
def test_the_export_writes_the_neurons_hot_first_and_records_the_order(powerinfer_export, tmp_path):
    """The export's GGUF holds each layer's neurons by descending activation count: file row r of ffn_gate, ffn_up,
    ffn_down_t and fc2 is row order[r] of the same tensors written in the model's order (from the export's own HF
    weights and predictors.safetensors, which keep the model's order), everything else is equal; activation/ holds
    the counts in file-row order (non-increasing); the dense-path file permutes ffn_down's columns alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsetune.export.powerinfer import hot_first_order
    from sparsetune.export.powerinfer_gguf import GGUF_FILE, read_neuron_order, write_activation_counts, write_gguf

    _, out = powerinfer_export
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    n, m = lm.config.num_hidden_layers, lm.config.intermediate_size
    threshold, fc_layers = powerinfer_layers(load_predictors(out), [b.post_attention_layernorm.weight
                                                                     for b in lm.model.layers])
    order = read_neuron_order(out)
    plain = _tensors(write_gguf(lm, tokenizer, fc_layers, threshold, tmp_path / "model_order.gguf"))
    hot = _tensors(out / GGUF_FILE)
    assert hot.keys() == plain.keys()
    per_neuron = ("ffn_gate", "ffn_up", "ffn_down_t", "fc2")
    moved = 0
    for name, a in hot.items():
        parts = name.split(".")
        if parts[0] == "blk" and parts[2] in per_neuron:
            o = order[int(parts[1])].numpy()
            assert np.array_equal(a, plain[name][o]), name  # the same rows, in the recorded order
            moved += not np.array_equal(a, plain[name])
        else:
            assert np.array_equal(a, plain[name]), name
    assert moved == n * len(per_neuron)  # really permuted, every per-neuron tensor of every layer
    # activation counts in the file's row order: non-increasing; in the model's order they sort to the same order
    counts = [torch.load(out / "activation" / f"activation_{i}.pt", weights_only=True) for i in range(n)]
    assert all(bool((c[:-1] >= c[1:]).all()) for c in counts)
    model_counts = [torch.empty_like(c).index_copy_(0, o, c) for c, o in zip(counts, order)]
    assert all(torch.equal(a, b) for a, b in zip(hot_first_order(model_counts), order))  # stable: ties by index
    write_activation_counts(model_counts, tmp_path, order)
    assert all(torch.equal(torch.load(tmp_path / "activation" / f"activation_{i}.pt", weights_only=True), counts[i])
               for i in range(n))
    # the dense-path file (bench_powerinfer.py's reference): ffn_down's columns, gate/up rows, in the same order
    dense_plain = _tensors(write_gguf(lm, tokenizer, None, 0.0, tmp_path / "dense.gguf"))
    dense_hot = _tensors(write_gguf(lm, tokenizer, None, 0.0, tmp_path / "dense_hot.gguf", neuron_order=order))
    for i in range(n):
        o = order[i].numpy()
        assert np.array_equal(dense_hot[f"blk.{i}.ffn_down.weight"], dense_plain[f"blk.{i}.ffn_down.weight"][:, o])
        assert np.array_equal(dense_hot[f"blk.{i}.ffn_gate.weight"], dense_plain[f"blk.{i}.ffn_gate.weight"][o])
    bad = [o.clone() for o in order]
    bad[0][0] = bad[0][1]
    for wrong in (bad, order[:-1], [torch.arange(m + 1)] * n):
        with pytest.raises(ValueError, match="neuron_order"):
            write_gguf(lm, tokenizer, fc_layers, threshold, tmp_path / "x.gguf", neuron_order=wrong)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.e2e
def test_the_bench_writes_the_export_again_in_the_models_own_order(powerinfer_export, tmp_path):
    """scripts/bench_powerinfer.py's `sparse_model_order` file: the export's GGUF with neuron_order=None (predictors
    built as the exporter builds them), its per-neuron rows those of the export's file mapped back through the
    recorded order, and activation/ in the model's order."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from sparsetune import load_sparse_model
    from sparsetune.export.powerinfer_gguf import GGUF_FILE, read_neuron_order
    from sparsetune.surgery.relufy import restore_hf_mlps
    from sparsetune.surgery.structure import base_causal_lm

    spec = importlib.util.spec_from_file_location(
        "bench_powerinfer", Path(__file__).resolve().parents[2] / "scripts" / "bench_powerinfer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, out = powerinfer_export
    plain = load_sparse_model(out)
    restore_hf_mlps(base_causal_lm(plain))
    lm = base_causal_lm(plain)
    path = bench.write_model_order_gguf(out, tmp_path / "model_order", lm, AutoTokenizer.from_pretrained(out),
                                        load_predictors(out))
    assert path == tmp_path / "model_order" / GGUF_FILE and path.read_bytes()[:4] == b"PWRI"
    order = read_neuron_order(out)
    model_order, hot = _tensors(path), _tensors(out / GGUF_FILE)
    for name, a in hot.items():
        parts = name.split(".")
        o = order[int(parts[1])].numpy() if parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down_t",
                                                                                 "fc2") else slice(None)
        assert np.array_equal(model_order[name][o], a), name
    counts = bench.model_order_counts(out)
    n = lm.config.num_hidden_layers
    for i in range(n):
        file_rows = torch.load(out / "activation" / f"activation_{i}.pt", weights_only=True)
        assert torch.equal(counts[i][order[i]], file_rows)
        assert torch.equal(torch.load(path.parent / "activation" / f"activation_{i}.pt", weights_only=True), counts[i])
