"""Load text (built-in corpus, local files, HF hub datasets), tokenize, and pack into fixed-length sequences."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from sparsetune.data.corpus import CORPUS_ALIAS, corpus_files
from sparsetune.errors import SparsetuneError
from sparsetune.recipe.schema import DataSection

_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HELD_OUT_SPLITS = ("validation", "valid", "test", "eval")


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in _LOCAL_BUILDERS or Path(path).exists()


def _load_local(path: str, key: str) -> datasets.Dataset:
    file = Path(path).expanduser()
    if not file.is_file():
        raise SparsetuneError(f"{key}: file not found: {path}")
    builder = _LOCAL_BUILDERS.get(file.suffix)
    if builder is None:
        raise SparsetuneError(
            f"{key}: unsupported file type {file.suffix!r} for {path} (expected {', '.join(_LOCAL_BUILDERS)})"
        )
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        raise SparsetuneError(f"{key}: could not read {path}: {str(exc).splitlines()[0]}") from None


def _load_hub(path: str, name: str | None, split: str, key: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, name=name, split=split)
    except Exception as exc:
        raise SparsetuneError(
            f"{key}: could not load dataset {path!r} split {split!r} from the Hugging Face hub: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def _hub_splits(path: str, name: str | None) -> list[str]:
    try:
        return list(datasets.get_dataset_split_names(path, name))
    except Exception:
        return []


def load_text_splits(cfg: DataSection) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out) datasets with the text in `cfg.text_field`."""
    if cfg.path == CORPUS_ALIAS:
        files = corpus_files()
        train = datasets.load_dataset("json", data_files=str(files["train"]), split="train")
        held = datasets.load_dataset("json", data_files=str(files["eval"]), split="train")
        held_from_train = False
    elif _looks_local(cfg.path):
        train = _load_local(cfg.path, "data.path")
        held, held_from_train = None, True
    else:
        train = _load_hub(cfg.path, cfg.name, cfg.split, "data.path")
        held, held_from_train = None, True
        wanted = [cfg.eval_split] if cfg.eval_split else [s for s in _HELD_OUT_SPLITS if s in _hub_splits(cfg.path, cfg.name)]
        if wanted and not cfg.eval_path:
            held, held_from_train = _load_hub(cfg.path, cfg.name, wanted[0], "data.eval_split"), False

    if cfg.eval_path:
        if cfg.eval_path == CORPUS_ALIAS:
            held = datasets.load_dataset("json", data_files=str(corpus_files()["eval"]), split="train")
        elif _looks_local(cfg.eval_path):
            held = _load_local(cfg.eval_path, "data.eval_path")
        else:
            held = _load_hub(cfg.eval_path, None, cfg.eval_split or "validation", "data.eval_path")
        held_from_train = False

    for ds, key in ((train, "data.path"),) + (((held, "data.eval_path"),) if held is not None else ()):
        if cfg.text_field not in ds.column_names:
            raise SparsetuneError(
                f"data.text_field: column {cfg.text_field!r} not found in {key} (columns: {', '.join(ds.column_names)})"
            )
    if held_from_train:
        if len(train) < 2:
            raise SparsetuneError(f"data.path: {cfg.path} has {len(train)} document(s); need at least 2 to hold one out")
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=0, shuffle=True)
        train, held = parts["train"], parts["test"]
    if cfg.max_documents is not None and len(train) > cfg.max_documents:
        train = train.select(range(cfg.max_documents))
    return train, held


@dataclass
class PackedData:
    """Token ids packed into rows of exactly seq_len tokens (documents joined by EOS)."""

    ids: np.ndarray  # [num_sequences, seq_len] int32

    def __len__(self) -> int:
        return self.ids.shape[0]


def pack(ds: datasets.Dataset, tokenizer, text_field: str, seq_len: int, what: str) -> PackedData:
    """Tokenize with the model's tokenizer and pack into [N, seq_len] rows (remainder dropped)."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        enc = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"ids": [ids + [eos] if eos is not None else ids for ids in enc]}

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {what}")
    flat = np.fromiter((t for row in tokenized["ids"] for t in row), dtype=np.int32)
    n = len(flat) // seq_len
    if n == 0:
        raise SparsetuneError(
            f"{what}: only {len(flat)} tokens, fewer than one sequence of data.seq_len={seq_len}; "
            "use more text or a smaller data.seq_len"
        )
    return PackedData(flat[: n * seq_len].reshape(n, seq_len))
