"""`pack`: rows built once with `datasets`, cached on disk and memory-mapped, identical to the in-memory packing
it replaced (the spec below), and safe to build from several processes at once."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch

from sparsetune.data import text_datasets
from sparsetune.data.batches import BatchStream, eval_batches, padding_batch
from sparsetune.data.text_datasets import PackedData, load_text_splits, pack, pack_key
from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import DataSection


def spec_rows(texts: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """The rows as packing has always defined them (and as the previous in-memory implementation built them):
    every document's tokens + EOS, concatenated, as int32, cut every seq_len tokens, the last partial row dropped."""
    eos = tokenizer.eos_token_id
    flat = np.array([t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]],
                    dtype=np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def docs_file(tmp_path, n: int = 200) -> str:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"Document {i} on topic {i % 7}: " + "sparse rows " * (i % 13)})
                            + "\n" for i in range(n)))
    return str(path)


@pytest.mark.parametrize("seq_len", [64, 37])
def test_rows_equal_the_concatenated_stream_on_the_default_corpus(tiny_tokenizer, monkeypatch, seq_len):
    # small tokenizer batches: the stream crosses many Arrow record batches, and rows straddle them
    monkeypatch.setattr(text_datasets, "_BATCH_DOCS", 50)
    train, held = load_text_splits(DataSection(path="stdlib-docs", seq_len=seq_len))
    for ds in (train, held):
        packed = pack(ds, tiny_tokenizer, "text", seq_len, "data.path")
        expected = spec_rows(ds["text"], tiny_tokenizer, seq_len)
        assert packed.ids.dtype == np.int32 and packed.ids.shape == expected.shape and len(packed) == len(expected)
        assert np.array_equal(packed.ids, expected)


def test_rows_are_memory_mapped_read_only_and_index_like_an_array(tmp_path, tiny_tokenizer):
    train, _ = load_text_splits(DataSection(path=docs_file(tmp_path), seq_len=16))
    packed = pack(train, tiny_tokenizer, "text", 16, "data.path")
    assert isinstance(packed.ids, np.memmap) and not packed.ids.flags.writeable
    with pytest.raises(ValueError):
        packed.ids[0, 0] = 1
    rows = np.asarray(packed.ids)  # an in-memory copy to compare against
    assert np.array_equal(packed.ids[[3, 1, 3]].astype(np.int64), rows[[3, 1, 3]])
    assert np.array_equal(packed.ids[2:5], rows[2:5]) and np.array_equal(packed.ids[0, :5], rows[0, :5])
    assert torch.from_numpy(packed.ids[:1].astype(np.int64)).dtype == torch.int64


def test_batches_are_the_same_from_the_cached_rows_as_from_in_memory_rows(tmp_path, tiny_tokenizer):
    train, held = load_text_splits(DataSection(path=docs_file(tmp_path), seq_len=16))
    mapped = pack(train, tiny_tokenizer, "text", 16, "data.path")
    in_memory = PackedData(spec_rows(train["text"], tiny_tokenizer, 16))
    for rank in (0, 1):
        a, b = (BatchStream(d, 3, seed=5, rank=rank, world_size=2, position=6) for d in (mapped, in_memory))
        for _ in range(2 * len(in_memory)):  # several epochs
            x, y = a.next_batch(), b.next_batch()
            assert torch.equal(x["input_ids"], y["input_ids"]) and x["input_ids"].dtype == torch.int64
    held_mapped = pack(held, tiny_tokenizer, "text", 16, "held-out data")
    held_memory = PackedData(spec_rows(held["text"], tiny_tokenizer, 16))
    for x, y in zip(eval_batches(held_mapped, 2, 3), eval_batches(held_memory, 2, 3), strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
    assert torch.equal(padding_batch(held_mapped)["input_ids"], padding_batch(held_memory)["input_ids"])


def test_a_second_pack_reuses_the_cached_rows(tmp_path, tiny_tokenizer, monkeypatch, packed_cache):
    calls = []
    tokenize = text_datasets._tokenize
    monkeypatch.setattr(text_datasets, "_tokenize", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    data = docs_file(tmp_path)
    train, _ = load_text_splits(DataSection(path=data, seq_len=16))
    first = pack(train, tiny_tokenizer, "text", 16, "data.path")
    (cached,) = packed_cache.glob("*.npy")
    mtime = cached.stat().st_mtime_ns
    # the same data loaded again, and a copy of the tokenizer last called with truncation: still the same rows
    again, _ = load_text_splits(DataSection(path=data, seq_len=16))
    tok = copy.deepcopy(tiny_tokenizer)
    tok(["a text to truncate"], truncation=True, max_length=2)
    second = pack(again, tok, "text", 16, "data.path")
    assert len(calls) == 1 and cached.stat().st_mtime_ns == mtime
    assert str(second.ids.filename) == str(first.ids.filename) == str(cached)
    assert np.array_equal(first.ids, second.ids)
    # whatever changes the rows changes the key
    pack(train, tiny_tokenizer, "text", 24, "data.path")
    pack(train.select(range(10)), tiny_tokenizer, "text", 16, "data.path")
    assert len(calls) == 3 and len(list(packed_cache.glob("*.npy"))) == 3
    assert not [p for p in packed_cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_the_key_depends_on_the_tokenizer_vocabulary(corpus_texts, tiny_tokenizer):
    from tests.tiny_models import train_tokenizer

    ds = datasets.Dataset.from_dict({"text": corpus_texts[:5]})
    other = train_tokenizer(corpus_texts[:60], vocab_size=400)
    assert pack_key(ds, tiny_tokenizer, "text", 16) != pack_key(ds, other, "text", 16)
    assert pack_key(ds, tiny_tokenizer, "text", 16) != pack_key(ds, tiny_tokenizer, "body", 16)


def test_too_little_text_is_an_error_and_leaves_nothing_behind(tiny_tokenizer, packed_cache):
    ds = datasets.Dataset.from_dict({"text": ["two words", "three more words"]})
    with pytest.raises(SparsetuneError, match=r"held-out data: only \d+ tokens, fewer than one sequence of "
                                              r"data.seq_len=4096"):
        pack(ds, tiny_tokenizer, "text", 4096, "held-out data")
    assert [p.name for p in packed_cache.iterdir() if not p.name.endswith(".lock")] == []


def test_with_datasets_caching_off_the_rows_are_private_and_leave_no_file(tmp_path, tiny_tokenizer, packed_cache):
    train, _ = load_text_splits(DataSection(path=docs_file(tmp_path), seq_len=16))
    datasets.disable_caching()
    try:
        packed = pack(train, tiny_tokenizer, "text", 16, "data.path")
    finally:
        datasets.enable_caching()
    assert np.array_equal(packed.ids, spec_rows(train["text"], tiny_tokenizer, 16))
    assert list(packed_cache.iterdir()) == []


_PACK_IN_A_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from transformers import AutoTokenizer
    from sparsetune.data.text_datasets import load_text_splits, pack
    from sparsetune.recipe.schema import DataSection

    tok_dir, data, out, me, other = sys.argv[1:]
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    Path(out, f"ready{me}").touch()
    while not Path(out, f"ready{other}").exists():  # start packing together, imports done
        time.sleep(0.01)
    train, _ = load_text_splits(DataSection(path=data, seq_len=16))
    packed = pack(train, tokenizer, "text", 16, "data.path")
    np.save(Path(out, f"rows{me}.npy"), np.asarray(packed.ids))
""")


@pytest.mark.slow
def test_two_processes_packing_into_an_empty_cache_get_the_same_rows(tmp_path, tiny_tokenizer):
    tok_dir, cache = tmp_path / "tok", tmp_path / "cache"
    tiny_tokenizer.save_pretrained(tok_dir)
    data = docs_file(tmp_path, n=3000)
    # loaded here first, so the processes race only in `pack` (not in `datasets` converting the file)
    train, _ = load_text_splits(DataSection(path=data, seq_len=16))
    env = dict(os.environ, SPARSETUNE_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", _PACK_IN_A_PROCESS, str(tok_dir), data, str(tmp_path), me, other],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=os.getcwd())
             for me, other in (("0", "1"), ("1", "0"))]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    rows = [np.load(tmp_path / f"rows{i}.npy") for i in (0, 1)]
    assert np.array_equal(rows[0], rows[1])
    assert np.array_equal(rows[0], spec_rows(train["text"], tiny_tokenizer, 16))
    # one file: both processes computed the same key (fingerprints agree across processes) and one built it
    assert len(list((cache / "packed").glob("*.npy"))) == 1
