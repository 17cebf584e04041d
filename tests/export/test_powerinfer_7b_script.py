"""scripts/bench_powerinfer_7b.py without PowerInfer: the synthetic files it streams have the exporter's layout and
metadata, its predictors keep exactly the requested neurons by PowerInfer's rule (idx = fc2 relu(fc1 x) >= threshold,
computed as ggml does for F16 weights), every kept neuron is active on every token, and its arithmetic (rank, sizes at
Llama-2-7B's shape, projection) holds. A tiny shape: seconds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_powerinfer_7b.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_powerinfer_7b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    """A tiny file pair (hidden 64, n_ff 1008 > 1000 as PowerInfer's neuron-sparse kernel needs, 2 layers, 2 heads of
    which 1 KV head, 400 tokens, rank 16)."""
    shape = bench.Shape(hidden=64, ffn=1008, layers=2, heads=2, kv_heads=1, vocab=400)
    shape.check()
    folder = tmp_path_factory.mktemp("bench7b")
    sparse, dense = folder / bench.SPARSE_FILE, folder / bench.DENSE_FILE
    bench.write_file(sparse, shape, 16, seed=3)
    bench.write_file(dense, shape, None, seed=3)
    return bench, shape, sparse, dense


def _value(reader, key):
    field = reader.fields[key]
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types[0].name == "STRING" else part.tolist()[0]


def test_the_files_have_the_exporters_layout_and_metadata(tiny):
    import gguf

    from sparsetune.export.powerinfer_gguf import llama_tensor_specs, read_gguf

    bench, shape, sparse, dense = tiny
    assert sparse.read_bytes()[:4] == b"PWRI" and dense.read_bytes()[:4] == b"GGUF"
    readers = {"sparse": read_gguf(sparse), "dense": gguf.GGUFReader(str(dense))}
    for kind, reader in readers.items():
        specs = llama_tensor_specs(400, 64, 2, 1008, 32, 16 if kind == "sparse" else None)
        got = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors]
        assert got == [(n, s, "F16" if dt == np.float16 else "F32") for n, s, dt in specs]
        assert _value(reader, "general.architecture") == "llama"
        for key, want in {"llama.embedding_length": 64, "llama.feed_forward_length": 1008, "llama.block_count": 2,
                          "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
                          "llama.rope.dimension_count": 32, "tokenizer.ggml.model": "llama",
                          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}.items():
            assert _value(reader, key) == want, key
        field = reader.fields["tokenizer.ggml.tokens"]
        tokens = [bytes(field.parts[i]).decode() for i in field.data]
        assert len(tokens) == len(set(tokens)) == 400  # the loader asserts unique tokens (llama.cpp:2571)
        assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x0A] == "<0x0A>"  # the newline byte token
    assert _value(readers["sparse"], "powerinfer.sparse_threshold") == 0.0
    assert "powerinfer.sparse_threshold" not in readers["dense"].fields
    # the same weights in both files; the down projection is written transposed in the sparse one
    tensors = {k: {t.name: np.asarray(t.data) for t in r.tensors} for k, r in readers.items()}
    for name, data in tensors["dense"].items():
        if ".ffn_down." in name:
            np.testing.assert_array_equal(data.T, tensors["sparse"][name.replace("ffn_down", "ffn_down_t")])
        else:
            np.testing.assert_array_equal(data, tensors["sparse"][name])
    assert bench.matches(sparse, shape, 16, 3) and bench.matches(dense, shape, None, 3)
    assert not bench.matches(sparse, shape, 32, 3) and not bench.matches(sparse, shape, 16, 4)
    assert sparse.stat().st_size >= bench.file_bytes(shape, 16)


def test_the_predictors_keep_exactly_the_requested_neurons_by_powerinfers_rule(tiny):
    """For every residual vector the file's model can produce (its token embeddings, and random vectors of the same
    construction), idx = fc2 relu(fc1 x) >= threshold keeps exactly round((1 - s) n_ff) neurons, the planned ones,
    spread over the rows."""
    bench, shape, sparse, _ = tiny
    index = bench.FileIndex.read(sparse)
    threshold = float(index.fields["powerinfer.sparse_threshold"])
    rng = np.random.default_rng(0)
    u = bench.u_rest(shape)
    random_x = rng.uniform(-u, u, (64, shape.hidden)).astype(np.float32)
    random_x[:, 0] = 1.0
    xs = np.concatenate([np.asarray(index.array("token_embd.weight"), np.float32), random_x])
    for skip in (0.0, 0.5, 0.7, 0.8, 0.9, 1.0):
        kept = bench.write_fc2(index, shape, skip, seed=3)
        assert set(kept.values()) == {round((1 - skip) * shape.ffn)}
        for layer in range(shape.layers):
            fc1 = np.asarray(index.array(f"blk.{layer}.fc1.weight"), np.float32)
            fc2 = np.asarray(index.array(f"blk.{layer}.fc2.weight"), np.float32)
            # ggml: the F32 input rounded to F16 for an F16 weight, F32 sums; relu; rounded to F16 again for fc2
            hidden = np.maximum(xs.astype(np.float16).astype(np.float32) @ fc1.T, 0)
            idx = hidden.astype(np.float16).astype(np.float32) @ fc2.T
            plan = bench.keep_mask(shape.ffn, skip, layer, seed=3)
            assert ((idx >= threshold) == plan[None, :]).all()
            assert np.abs(idx).min() > 0  # no neuron sits on the threshold
            # spread: any thread's block of the down projection's rows (2, 4 or 8 threads) gets its share
            for threads in (2, 4, 8):
                shares = plan.reshape(threads, -1).sum(1)
                assert np.abs(shares - plan.sum() / threads).max() <= 2
        # the script's own check agrees
        np.testing.assert_array_equal(bench.engine_kept(index, shape, list(range(10))),
                                      round((1 - skip) * shape.ffn))


@pytest.mark.parametrize("cluster", [1, 7, 64])
def test_the_kept_rows_are_exact_in_number_and_spread_in_runs_of_cluster_rows(bench, cluster):
    for n_ff in (1008, 11008):
        for skip in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
            plan = bench.keep_mask(n_ff, skip, 0, 5, cluster)
            k = round((1 - skip) * n_ff)
            assert plan.sum() == k
            shares = plan.reshape(8, -1).sum(1)
            assert np.abs(shares - k / 8).max() <= 2 * cluster
            if 0 < k < n_ff:  # runs of kept rows: all of `cluster` rows but for the trimmed one(s)
                runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], plan.astype(int), [0]]))))[::2]
                assert (runs % cluster == 0).sum() >= len(runs) - 2


def test_every_kept_neuron_is_active_on_every_token(tiny):
    """PowerInfer's down projection also skips neurons whose activation is 0 (ggml.c:14422): the construction keeps
    relu(gate) * up positive and within F16 for every token and neuron, so the predictors alone set the skipped
    fraction. The residual stream stays the token's embedding (attention output and down projection are 0)."""
    bench, shape, sparse, _ = tiny
    index = bench.FileIndex.read(sparse)
    for layer in range(shape.layers):
        assert not np.asarray(index.array(f"blk.{layer}.attn_output.weight")).any()
        assert not np.asarray(index.array(f"blk.{layer}.ffn_down_t.weight")).any()
    x = np.asarray(index.array("token_embd.weight"), np.float32)
    normed = x / np.sqrt((x * x).mean(1, keepdims=True) + shape.rms_eps)
    normed = normed.astype(np.float16).astype(np.float32)  # the F16 weights' input, as ggml rounds it
    bounds = bench.activation_bounds(shape)
    for layer in range(shape.layers):
        gate = normed @ np.asarray(index.array(f"blk.{layer}.ffn_gate.weight"), np.float32).T
        up = normed @ np.asarray(index.array(f"blk.{layer}.ffn_up.weight"), np.float32).T
        act = np.maximum(gate, 0) * up
        assert act.min() >= bounds["activation_min"] > 0
        assert act.max() <= bounds["activation_max"] < 65504
        assert (act.astype(np.float16) != 0).all()


def test_rank_sizes_and_bounds_at_llama2_7b_shape(bench):
    shape = bench.Shape()
    shape.check()
    assert (shape.hidden, shape.ffn, shape.layers, shape.heads, shape.vocab) == (4096, 11008, 32, 32, 32000)
    rank = bench.predictor_rank(shape, 0.10)
    assert rank == 880 and rank * (4096 + 11008) <= 0.10 * 3 * 4096 * 11008 < (rank + 16) * (4096 + 11008)
    mlp = 32 * 3 * 4096 * 11008 * 2
    embed = 2 * 32000 * 4096 * 2
    attn = 32 * 4 * 4096 * 4096 * 2
    norms = (2 * 32 + 1) * 4096 * 4
    assert bench.file_bytes(shape, None) == embed + attn + mlp + norms  # 13.5 GB: the dense path's file
    assert bench.file_bytes(shape, rank) == embed + attn + mlp + norms + 32 * rank * (4096 + 11008) * 2
    b = bench.activation_bounds(shape)
    assert b["activation_min"] > 1000 and b["activation_max"] < 65504 / 4 and b["fc1_min"] > 0.7
    with pytest.raises(SystemExit, match="--ffn must be > 1000"):
        bench.Shape(hidden=256, ffn=688, layers=2, heads=4, kv_heads=4, vocab=32000).check()


def test_the_projection_interpolates_time_per_token(bench):
    skips = [0.0, 0.5, 0.7, 0.8, 0.9]
    ms = [100 - 60 * s for s in skips]  # time affine in the skipped fraction: T_mlp = 60 ms
    p = bench.project(skips, ms, dense_ms=90.0, predictor_fraction=0.10, skip_star=0.492, fraction_star=0.05)
    assert p["interpolated_between"] == [0.0, 0.5] and not p["extrapolated"]
    assert p["ms_per_token_at_skip"] == pytest.approx(100 - 60 * 0.492)
    assert p["mlp_ms_per_token_at_0"] == pytest.approx(60)
    assert p["projected_ms_per_token"] == pytest.approx(100 - 60 * 0.492 - 0.05 * 60)
    assert p["speedup_over_dense_path"] == pytest.approx(90 / p["projected_ms_per_token"])
    beyond = bench.project(skips, ms, 90.0, 0.10, 0.95, 0.10)
    assert beyond["extrapolated"] and beyond["projected_ms_per_token"] == pytest.approx(100 - 60 * 0.95)
    # with 0% and 100% measured, T_mlp is their difference (a curve that is not a line: scattered rows)
    curve = bench.project([0, 0.5, 1], [100, 120, 50], 90.0, 0.10, 0.25, 0.05)
    assert curve["mlp_ms_per_token_at_0"] == pytest.approx(50) and curve["mlp_ms_from"] == "0% minus 100% skipped"
    assert curve["projected_ms_per_token"] == pytest.approx(110 - 0.05 * 50)


def test_write_gguf_tensors_streams_row_blocks_and_refuses_a_wrong_shape(tmp_path):
    import gguf

    from sparsetune.export.powerinfer_gguf import open_gguf, write_gguf_tensors

    specs = [("a.weight", (5, 4), np.float16), ("b.weight", (3,), np.float32)]
    a = np.arange(20, dtype=np.float16).reshape(5, 4)
    path = write_gguf_tensors(tmp_path / "x.gguf", lambda w: w.add_uint32("k", 7), specs,
                              [iter([a[:2], a[2:]]), np.ones(3, np.float32)], sparse=True)
    reader = open_gguf(path)  # PWRI magic, memory-mapped, no copy
    np.testing.assert_array_equal(np.asarray(reader.tensors[0].data), a)
    assert reader.tensors[1].data.tolist() == [1, 1, 1] and _value(reader, "k") == 7
    with open(path, "rb") as f:
        f.seek(reader.tensors[0].data_offset)
        assert f.read(40) == a.tobytes()
    # the reader's own magic check is restored after open_gguf
    with pytest.raises(ValueError, match="GGUF magic"):
        gguf.GGUFReader(str(path))
    with pytest.raises(ValueError, match="rows written"):
        write_gguf_tensors(tmp_path / "y.gguf", lambda w: None, specs, [iter([a[:2]]), np.ones(3, np.float32)], True)
    with pytest.raises(ValueError, match="the layout says"):
        write_gguf_tensors(tmp_path / "z.gguf", lambda w: None, specs, [a.T, np.ones(3, np.float32)], True)
    assert not (tmp_path / "y.gguf").exists() and not (tmp_path / "z.gguf").exists()
