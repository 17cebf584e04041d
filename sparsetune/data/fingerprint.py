"""Which rows a run trains and evaluates on: a sha256 over the packed token rows of each split.

Every checkpoint records it (`data_fingerprint.json`), so a resume on data that changed since the run started (a
data file edited in place, a hub dataset that moved on) is told apart from a resume on the same data: the recipe's
data keys can be the same while the rows are not. Hashing the packed rows (not the source files) covers every way
the rows can change, including the held-out split cut out of the same documents; it reads the memory-mapped rows
once (about a second per GB).
"""

from __future__ import annotations

import hashlib

from sparsetune.data.text_datasets import PackedData
from sparsetune.recipe.schema import DataSection

FILE = "data_fingerprint.json"
_ROWS_AT_A_TIME = 1 << 14


def rows_sha256(data: PackedData) -> str:
    """sha256 of the rows' shape and their int32 token ids, in order."""
    h = hashlib.sha256(f"{data.ids.shape[0]}x{data.ids.shape[1]}:{data.ids.dtype.str}\0".encode())
    for start in range(0, len(data), _ROWS_AT_A_TIME):
        h.update(data.ids[start:start + _ROWS_AT_A_TIME].tobytes())
    return h.hexdigest()


def data_fingerprint(cfg: DataSection, train: PackedData, held_out: PackedData) -> dict:
    """What checkpoints record: each split's row count and sha256, and where the data came from."""
    return {"train": {"rows": len(train), "sha256": rows_sha256(train)},
            "held_out": {"rows": len(held_out), "sha256": rows_sha256(held_out)},
            "data.path": cfg.path, "data.eval_path": cfg.eval_path}


def data_change(saved: dict, now: dict) -> tuple[str, str] | None:
    """(what changed between two fingerprints, naming the data keys whose rows changed; what a resume on the new
    rows does differently, e.g. "train on other rows"), or None for the same rows."""
    parts, keys, effects = [], [], []
    for split, what, effect in (("train", "training rows", "train on other rows"),
                                ("held_out", "held-out rows", "evaluate on other held-out rows")):
        old, new = saved.get(split, {}), now[split]
        if old.get("sha256") == new["sha256"]:
            continue
        effects.append(effect)
        parts.append(f"{what} {old.get('rows')} -> {new['rows']}, sha256 {str(old.get('sha256'))[:12]} -> "
                     f"{new['sha256'][:12]}")
        key = "data.eval_path" if split == "held_out" and now.get("data.eval_path") else "data.path"
        if key not in keys:
            keys.append(key)
    if not parts:
        return None
    names = " and ".join(f"{k} {now.get(k)}" for k in keys)
    return f"{names} changed since the run started (fingerprint: {'; '.join(parts)})", " and ".join(effects)
