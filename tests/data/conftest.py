from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def packed_cache(tmp_path, monkeypatch) -> Path:
    """Packed rows of each data test go to a fresh folder (not the user's cache, not another test's files)."""
    from sparsetune.data import text_datasets

    folder = tmp_path / "packed-cache"
    folder.mkdir()
    monkeypatch.setattr(text_datasets, "packed_cache_dir", lambda: folder)
    return folder
