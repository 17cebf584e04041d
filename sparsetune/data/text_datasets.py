"""Load text (built-in corpus, local files, HF hub datasets), tokenize, and pack into fixed-length sequences.

Packing runs once per (dataset, tokenizer, text field, seq_len) and lands in a cached .npy file that every process
memory-maps, so a multi-process run holds the packed corpus once (in the page cache), not once per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock

from sparsetune.data.corpus import CORPUS_ALIAS, corpus_files
from sparsetune.errors import SparsetuneError
from sparsetune.paths import cache_dir, check_path_text, unwritable_cache
from sparsetune.recipe.schema import DataSection

_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HELD_OUT_SPLITS = ("validation", "valid", "test", "eval")


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in _LOCAL_BUILDERS or Path(path).exists()


_CHUNK = 1 << 20  # bytes read at a time when looking for what is wrong with a file
_JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}


def _encoding_problem(file: Path) -> str | None:
    """Why `file` is no UTF-8 text: its first byte that is not UTF-8, or a NUL byte (binary data)."""
    offset, carry = 0, b""
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            data, carry, bad = carry + chunk, b"", None
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data" and exc.end == len(data):
                    carry = data[exc.start:]  # a character cut by the chunk boundary: the next chunk completes it
                else:
                    bad = exc.start
            nul = data.find(b"\0")
            if nul >= 0 and (bad is None or nul < bad):
                return f"is binary data, not text (a NUL byte at offset {offset + nul})"
            if bad is not None:
                return (f"is not UTF-8 text (byte 0x{data[bad]:02x} at offset {offset + bad}): binary data, or text "
                        "in another encoding such as Latin-1")
            offset += len(data) - len(carry)
    return f"is not UTF-8 text (it ends inside a character at offset {offset})" if carry else None


def _record_problem(record, where: str, text_field: str) -> str | None:
    """What makes one JSON record unusable: not an object, or no string in `text_field`."""
    if not isinstance(record, dict):
        return f"{where} is a JSON {_JSON_KINDS.get(type(record))}, not an object"
    if text_field not in record:
        fields = ", ".join(list(record)[:8]) or "no fields"
        return f"{where} has no field {text_field!r} (data.text_field; it has: {fields})"
    if not isinstance(record[text_field], str):
        return (f"{where}: field {text_field!r} (data.text_field) is a JSON {_JSON_KINDS.get(type(record[text_field]))}"
                ", not a string")
    return None


def _json_problem(file: Path, text_field: str) -> str | None:
    """The first record of a UTF-8 .json/.jsonl file that is not valid JSON, not an object or lacks `text_field`.

    A .jsonl file holds one object per line; a .json file may also be one JSON array of objects (or one object)."""
    if file.suffix == ".json":
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": more than one value, i.e. JSON lines: checked below
                return f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        else:
            records = document if isinstance(document, list) else [document]
            return next((p for i, r in enumerate(records) if (p := _record_problem(r, f"record {i + 1}", text_field))),
                        None)
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})"
            if problem := _record_problem(record, f"line {number}", text_field):
                return problem + ("; a .jsonl file holds one JSON object per line" if isinstance(record, list) else "")
    return None


def _file_problem(file: Path, builder: str, text_field: str) -> str | None:
    """What is wrong with a local data file, as precisely as the bytes tell (None: nothing found)."""
    if file.stat().st_size == 0:
        return "is empty"
    if builder == "parquet":
        return None  # binary by design; `datasets` says what is wrong with it
    return _encoding_problem(file) or (_json_problem(file, text_field) if builder == "json" else None)


def _column_problem(ds: datasets.Dataset, text_field: str) -> str | None:
    """What `datasets` let through that tokenizing would trip on: no documents, text that is missing, not a
    string, not UTF-8 or binary. Arrow-level checks, cheap enough to run on every load."""
    if len(ds) == 0:
        return "holds no documents"
    if text_field not in ds.column_names:
        return None  # load_text_splits names the columns there are
    if ds.features[text_field] not in (datasets.Value("string"), datasets.Value("large_string")):
        return f"field {text_field!r} (data.text_field) holds {ds.features[text_field]}, not text"
    column = ds.data.column(text_field)
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        return f"record {row + 1} has no field {text_field!r} (data.text_field)"
    try:
        column.validate(full=True)  # pyarrow's JSON reader does not check that strings are UTF-8
    except pa.ArrowInvalid:
        return "is not UTF-8 text"
    if pc.any(pc.match_substring(column, "\0")).as_py():
        return "is binary data, not text (it holds NUL bytes)"
    return None


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, datasets.exceptions.DatasetGenerationError):  # "An error occurred while generating..."
        exc = exc.__cause__ or exc.__context__ or exc
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_local(path: str, key: str, text_field: str) -> datasets.Dataset:
    """A local .txt/.json/.jsonl/.parquet file as a dataset; a one-line error naming `key`, the file and what is
    wrong with it (where in the file, when the bytes tell)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SparsetuneError(f"{key}: file not found: {path}")
    builder = _LOCAL_BUILDERS.get(file.suffix)
    if builder is None:
        raise SparsetuneError(
            f"{key}: unsupported file type {file.suffix!r} for {path} (expected {', '.join(_LOCAL_BUILDERS)})"
        )
    with open(file, "rb") as f:
        starts_with_array = f.read(4096).lstrip()[:1] == b"["
    # `datasets` takes an empty file as an error and any JSON array as rows (of strings, even): check first.
    if file.stat().st_size == 0 or (builder == "json" and starts_with_array):
        if problem := _file_problem(file, builder, text_field):
            raise SparsetuneError(f"{key}: {path} {problem}")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs a parse error before raising: said below
    try:
        ds = datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        problem = _file_problem(file, builder, text_field) or f"could not be read: {_first_line(exc)}"
        raise SparsetuneError(f"{key}: {path} {problem}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if problem := _column_problem(ds, text_field):
        raise SparsetuneError(f"{key}: {path} {_file_problem(file, builder, text_field) or problem}")
    return ds


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


def _check_eval_split(cfg: DataSection) -> None:
    """data.eval_split names a split of the held-out source (data.eval_path, else data.path). Only hub datasets
    have named splits, and stdlib-docs its 'eval' split: refuse any other value rather than ignore it."""
    if cfg.eval_split is None:
        return
    key, source = ("data.eval_path", cfg.eval_path) if cfg.eval_path else ("data.path", cfg.path)
    if source == CORPUS_ALIAS:
        if cfg.eval_split != "eval":
            raise SparsetuneError(f"data.eval_split={cfg.eval_split!r}: {key} {CORPUS_ALIAS} has the splits train and "
                                  "eval, and holds out 'eval'; set data.eval_split=eval or leave it unset")
    elif _looks_local(source):
        raise SparsetuneError(
            f"data.eval_split={cfg.eval_split!r}: {key} {source} is a local file, which has no named splits; leave "
            "data.eval_split unset (held-out text comes from data.eval_path, else data.eval_fraction of data.path)"
        )


def load_text_splits(cfg: DataSection) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out) datasets with the text in `cfg.text_field`."""
    for key, value in (("data.path", cfg.path), ("data.eval_path", cfg.eval_path)):
        if value is not None:
            check_path_text(value, f"{key} =")
    _check_eval_split(cfg)
    if cfg.path == CORPUS_ALIAS:
        files = corpus_files()
        train = datasets.load_dataset("json", data_files=str(files["train"]), split="train")
        held = datasets.load_dataset("json", data_files=str(files["eval"]), split="train")
        held_from_train = False
    elif _looks_local(cfg.path):
        train = _load_local(cfg.path, "data.path", cfg.text_field)
        held, held_from_train = None, True
    else:
        train = _load_hub(cfg.path, cfg.name, cfg.split, "data.path")
        held, held_from_train = None, True
        available = [] if cfg.eval_split else _hub_splits(cfg.path, cfg.name)
        wanted = [cfg.eval_split] if cfg.eval_split else [s for s in _HELD_OUT_SPLITS if s in available]
        if wanted and not cfg.eval_path:
            held, held_from_train = _load_hub(cfg.path, cfg.name, wanted[0], "data.eval_split"), False

    if cfg.eval_path:
        if cfg.eval_path == CORPUS_ALIAS:
            held = datasets.load_dataset("json", data_files=str(corpus_files()["eval"]), split="train")
        elif _looks_local(cfg.eval_path):
            held = _load_local(cfg.eval_path, "data.eval_path", cfg.text_field)
        else:
            held = _load_hub(cfg.eval_path, None, cfg.eval_split or "validation", "data.eval_path")
        held_from_train = False

    for ds, key, path in ((train, "data.path", cfg.path), (held, "data.eval_path", cfg.eval_path or cfg.path)):
        if ds is not None and cfg.text_field not in ds.column_names:
            raise SparsetuneError(f"data.text_field: column {cfg.text_field!r} not found in {key} "
                                  f"(columns: {', '.join(ds.column_names)}), read from {path}")
    if held_from_train:
        if len(train) < 2:
            raise SparsetuneError(
                f"data.path: {cfg.path} has {len(train)} document(s); need at least 2 to hold one out"
            )
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=0, shuffle=True)
        train, held = parts["train"], parts["test"]
    if cfg.max_documents is not None and len(train) > cfg.max_documents:
        train = train.select(range(cfg.max_documents))
    return train, held


@dataclass
class PackedData:
    """Token ids packed into rows of exactly seq_len tokens (documents joined by EOS).

    From `pack`, `ids` is a read-only `np.memmap` of a cached .npy file: every process of a run maps the same
    file, so the corpus sits once in the page cache instead of once per process. Indexing it (`ids[rows]`,
    `ids[a:b]`) reads only those rows.
    """

    ids: np.ndarray  # [num_sequences, seq_len] int32

    def __len__(self) -> int:
        return self.ids.shape[0]


# Bump when the bytes a cached file holds for the same inputs change (tokenize call, separator, layout).
_PACK_FORMAT = 1
_TOKENS = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})  # int32: half of int64 on disk
# Documents per tokenizer call (and per Arrow record batch). What one call returns, Rust encodings plus Python
# int lists (~100 bytes a token), is the peak memory of packing: 1000 long documents made it ~0.8 GB.
_BATCH_DOCS = 100


def packed_cache_dir() -> Path:
    """Where packed rows are cached: packed/ in the sparsetune cache (see `sparsetune.paths.cache_dir`)."""
    return cache_dir("packed")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the tokenizer's class and its full serialized state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            # Left over from the last call (transformers sets them per call), not part of the tokenizer: two
            # equal tokenizers must hash the same whatever they were last called with. Clear them on a copy.
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        desc = backend.to_str()  # vocabulary, merges, added tokens, normalizer, pre-tokenizer...
    else:  # a slow (Python) tokenizer: hash the whole object, as `datasets` does for map functions
        from datasets.fingerprint import Hasher

        desc = Hasher.hash(tokenizer)
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{desc}".encode()).hexdigest()


def pack_key(ds: datasets.Dataset, tokenizer, text_field: str, seq_len: int) -> str:
    """Cache key of the packed rows: same key, same rows.

    `datasets` has no public name for a dataset's fingerprint; `_fingerprint` covers its source files (path and
    modification time for local files), the selection and the order of its rows, and it is the same in every
    process that loads the same data the same way.
    """
    parts = {"format": _PACK_FORMAT, "dataset": ds._fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer),
             "eos": tokenizer.eos_token_id, "text_field": text_field, "seq_len": seq_len}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _tokenize(ds: datasets.Dataset, tokenizer, text_field: str, what: str, out: Path, key: str) -> datasets.Dataset:
    """Token ids (+ EOS) of every document, in order, written by `datasets` to the Arrow file `out` as int32 lists
    (one batch of documents in memory at a time)."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        enc = tokenizer(batch[text_field], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"ids": [ids + [eos] if eos is not None else ids for ids in enc]}

    # new_fingerprint: the key already identifies the result; this skips hashing the tokenizer once more.
    return ds.map(tokenize, batched=True, batch_size=_BATCH_DOCS, writer_batch_size=_BATCH_DOCS,
                  remove_columns=ds.column_names, features=_TOKENS, cache_file_name=str(out),
                  load_from_cache_file=False, new_fingerprint=key, desc=f"Tokenizing {what}")


def _token_chunks(arrow_files: list[str]):
    """The flat int32 token stream of `datasets` Arrow files, one record batch at a time.

    Read with plain file reads rather than a memory map, so the pages read do not stay mapped into (and counted
    in the RSS of) the packing process."""
    for name in arrow_files:
        with pa.OSFile(name) as src:
            for batch in pa.ipc.open_stream(src):
                yield batch.column(batch.schema.get_field_index("ids")).flatten().to_numpy()


def _write_rows(arrow_files: list[str], out: Path, rows: int, seq_len: int) -> None:
    """Write the first rows * seq_len tokens as an .npy array [rows, seq_len] int32, chunk by chunk."""
    header = {"descr": np.dtype(np.int32).str, "fortran_order": False, "shape": (rows, seq_len)}
    left = rows * seq_len
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in _token_chunks(arrow_files):
            f.write(chunk[:left].tobytes())
            left -= min(left, len(chunk))
            if left == 0:
                break
        f.flush()
        os.fsync(f.fileno())
    if left:
        raise RuntimeError(f"packing {out}: the token stream ended {left} tokens short")  # a bug, not bad input


def _build(ds: datasets.Dataset, tokenizer, text_field: str, seq_len: int, what: str, key: str, dest: Path) -> None:
    """Tokenize and pack `ds` into the .npy file `dest` (replaced atomically when complete)."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{key}-") as tmp:
        tokenized = _tokenize(ds, tokenizer, text_field, what, Path(tmp) / "tokens.arrow", key)
        lengths = pc.list_value_length(tokenized.data.column("ids"))  # reads the list offsets only
        total = int(pc.sum(lengths).as_py() or 0)  # None for no documents
        rows = total // seq_len  # the whole stream is cut, so only its last partial row is dropped
        if rows == 0:
            raise SparsetuneError(
                f"{what}: only {total} tokens, fewer than one sequence of data.seq_len={seq_len}; "
                "use more text or a smaller data.seq_len"
            )
        partial = Path(tmp) / "rows.npy"
        _write_rows([f["filename"] for f in tokenized.cache_files], partial, rows, seq_len)
        del tokenized  # drop the memory map of tokens.arrow before its folder goes
        os.replace(partial, dest)


def _map_rows(path: Path) -> PackedData:
    return PackedData(np.load(path, mmap_mode="r"))


def pack(ds: datasets.Dataset, tokenizer, text_field: str, seq_len: int, what: str) -> PackedData:
    """Tokenize with the model's tokenizer and pack into [N, seq_len] rows (remainder dropped), memory-mapped.

    The rows are those of concatenating every document's tokens + EOS and cutting the stream every seq_len
    tokens. They are built once per (dataset, tokenizer, text_field, seq_len) into `packed_cache_dir()`, under a
    file lock: a concurrent call (another rank, another command) waits, then maps the same file. The result is
    the same as packing in memory, so the batch at a step (a function of seed and position) is unchanged.
    """
    folder = packed_cache_dir()
    try:
        if not datasets.is_caching_enabled():
            # Fingerprints are random with caching off: a cached file could never be found again, so build a
            # private one and unlink it at once (the memory map keeps it readable until the last reference goes).
            private = Path(tempfile.mkdtemp(dir=folder, prefix=".uncached-"))
            try:
                _build(ds, tokenizer, text_field, seq_len, what, "uncached", private / "rows.npy")
                return _map_rows(private / "rows.npy")
            finally:
                shutil.rmtree(private, ignore_errors=True)
        key = pack_key(ds, tokenizer, text_field, seq_len)
        dest = folder / f"{key}-L{seq_len}.npy"
        if not dest.is_file():
            with FileLock(f"{dest}.lock"):
                if not dest.is_file():  # not built by whoever held the lock before us
                    for stale in dest.parent.glob(f".{key}-*"):  # left by a killed build: nobody else builds this key
                        shutil.rmtree(stale, ignore_errors=True)
                    _build(ds, tokenizer, text_field, seq_len, what, key, dest)
    except OSError as exc:  # the folder exists but cannot be written: a read-only or full filesystem
        raise unwritable_cache(folder, exc) from None
    return _map_rows(dest)
