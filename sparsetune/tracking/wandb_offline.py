"""Read an offline W&B run file (run-<id>.wandb) back: its run id and logged history.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then
records in 32 KiB blocks, each with a 7-byte header (crc32, little-endian length, type)
around a serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_offline_run(path: Path) -> dict:
    """{'run_ids': [...], 'history': [{key: value, '_step': n}, ...]} from a run-*.wandb file or run folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    files = sorted(path.glob("run-*.wandb")) if path.is_dir() else [path]
    run_ids, history = [], []
    for file in files:
        for payload in _payloads(file.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.append(record.run.run_id)
            elif kind == "history":
                row = {}
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                history.append(row)
    return {"run_ids": run_ids, "history": history}
