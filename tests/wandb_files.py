"""Read what a W&B offline run wrote: the history rows in its `run-*.wandb` file.

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB log records
(32 KiB blocks; each record: crc32, length, type FULL/FIRST/MIDDLE/LAST) holding protobuf `Record`s."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B transaction log"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:              # block trailer: padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        chunk = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        else:                                   # zero padding at the end of a block
            offset += BLOCK - offset % BLOCK if offset % BLOCK else 0


def history(run_file) -> list:
    """The rows the run logged, as dicts of key -> value."""
    from wandb.proto import wandb_internal_pb2
    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
