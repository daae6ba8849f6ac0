"""Read a wandb offline run file (``run-*.wandb``) back into protobuf records, for tests.

The file is a LevelDB-style log: a 7-byte header starting ``:W&B``, then 32 KiB blocks of records,
each ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)`` and the
payload; a block tail shorter than 7 bytes is padding. Each reassembled payload is a
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7
RECORD_HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_files(root: Path) -> list[Path]:
    """Every offline run file under ``root`` (e.g. the run folder handed to wandb as ``dir``)."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"))


def read_records(path: Path) -> list:
    """All records of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    payloads, pending, offset = [], b"", HEADER_SIZE
    while offset + RECORD_HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < RECORD_HEADER_SIZE:
            offset += left_in_block  # padding at the end of a block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + RECORD_HEADER_SIZE])
        offset += RECORD_HEADER_SIZE
        chunk = data[offset : offset + length]
        offset += length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
            pending = b""
        else:  # zero-filled tail of a file still being written
            break
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history_keys(records: list) -> set[str]:
    """Every key logged with ``run.log`` in these records."""
    keys = set()
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                keys.add(item.key or "/".join(item.nested_key))
    return keys


def history_rows(records: list) -> list[dict[str, str]]:
    """Logged rows as {key: value_json} dicts, in order."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): item.value_json for item in record.history.item})
    return rows


def alerts(records: list) -> list[tuple[str, str]]:
    """(title, text) of every ``run.alert`` in these records."""
    return [(r.alert.title, r.alert.text) for r in records if r.WhichOneof("record_type") == "alert"]
