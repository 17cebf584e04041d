import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n N` (scripts/test.sh) the workers share the machine's cores: one thread each, for this process
    # and every process it starts (set before torch is imported).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

from tests.tiny_models import FAMILIES, save_tiny_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    from sparsetune.data.corpus import corpus_files

    files = corpus_files()
    return [json.loads(line)["text"] for line in files["train"].read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_texts):
    return train_tokenizer(corpus_texts[:120], vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """family -> saved tiny model folder (config + safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: save_tiny_model(root / f, f, tiny_tokenizer) for f in FAMILIES}


def pytest_collection_modifyitems(config, items):
    """Tests that share a group's multi-process runs (`xdist_group`, tests/distributed) first: under `-n 2 --dist
    loadgroup` each group is one unit of work on one worker, and the long units started first leave the short tests
    to fill in beside them."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
