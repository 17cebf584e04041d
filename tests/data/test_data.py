import json

import numpy as np
import pytest

from sparsetune.data.batches import BatchStream, eval_batches
from sparsetune.data.corpus import corpus_files
from sparsetune.data.text_datasets import PackedData, load_text_splits, pack
from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import DataSection


def test_default_corpus_has_disjoint_train_and_held_out_modules():
    files = corpus_files()
    sources = {k: {json.loads(line)["source"] for line in p.read_text().splitlines()} for k, p in files.items()}
    assert len(sources["train"]) > 100 and len(sources["eval"]) >= 5
    assert not sources["train"] & sources["eval"]


def test_batch_stream_is_a_pure_function_of_position_and_ranks_are_disjoint():
    data = PackedData(np.arange(40 * 4, dtype=np.int32).reshape(40, 4))
    straight = BatchStream(data, 3, seed=7)
    seq = [straight.next_batch()["input_ids"] for _ in range(30)]  # crosses epochs
    resumed = BatchStream(data, 3, seed=7, position=straight.position - 3 * 10)
    for expected in seq[20:]:
        assert (resumed.next_batch()["input_ids"] == expected).all()
    # each epoch visits every sequence exactly once
    first_epoch = np.concatenate([b[:, 0].numpy() for b in seq])[:40] // 4
    assert sorted(first_epoch.tolist()) == list(range(40))
    r0, r1 = BatchStream(data, 2, seed=1, rank=0, world_size=2), BatchStream(data, 2, seed=1, rank=1, world_size=2)
    single = BatchStream(data, 4, seed=1)
    for _ in range(5):
        a, b = r0.next_batch()["input_ids"], r1.next_batch()["input_ids"]
        assert (np.concatenate([a, b]) == single.next_batch()["input_ids"].numpy()).all()
    assert r0.position == r1.position == single.position


def test_eval_batches_are_fixed_and_sharded():
    data = PackedData(np.arange(10 * 4, dtype=np.int32).reshape(10, 4))
    all_rows = np.concatenate([b["input_ids"].numpy() for b in eval_batches(data, 2, 4)])
    assert (all_rows == data.ids[:8]).all()
    split = [np.concatenate([b["input_ids"].numpy() for b in eval_batches(data, 2, 4, rank=r, world_size=2)])
             for r in (0, 1)]
    assert sorted(np.concatenate(split)[:, 0].tolist()) == sorted(data.ids[:8, 0].tolist())


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files_load_and_hold_out_documents(tmp_path, suffix, tiny_tokenizer):
    docs = [f"Document {i} talks about topic {i % 7} at some length, twice: {i} {i}." for i in range(60)]
    path = tmp_path / f"docs{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": docs}), path)
    field = "text" if suffix == ".txt" else "body"
    train, held = load_text_splits(DataSection(path=str(path), text_field=field, eval_fraction=0.1))
    assert len(train) + len(held) == 60 and len(held) == 6
    assert not set(train[field]) & set(held[field])
    packed = pack(train, tiny_tokenizer, field, 16, "data.path")
    assert packed.ids.shape[1] == 16 and packed.ids.dtype == np.int32


def test_data_errors_name_the_key_and_file(tmp_path):
    with pytest.raises(SparsetuneError, match=r"data.path: file not found: .*missing.jsonl"):
        load_text_splits(DataSection(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(SparsetuneError, match=r"unsupported file type '.csv'.*expected .txt, .jsonl, .json, .parquet"):
        load_text_splits(DataSection(path=str(tmp_path / "d.csv")))
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(SparsetuneError,
                       match=r"data.text_field: column 'text' not found in data.path \(columns: body\)"):
        load_text_splits(DataSection(path=str(tmp_path / "d.jsonl")))
