"""Read what an offline W&B run wrote: the history rows in its ``run-<id>.wandb`` file.

The file is a 7-byte header (``:W&B``, a 2-byte magic, a version byte) followed by LevelDB's log
format: 32 KiB blocks of records, each ``crc32 (4) | length (2, little-endian) | type (1) | data``,
where a block's tail of fewer than 7 bytes is zero padding and a record that does not fit in a block
is split into FIRST (2), MIDDLE (3) and LAST (4) pieces (FULL (1) is a whole one). Each record's data
is a ``wandb_internal_pb2.Record`` protobuf; ``history`` records hold ``wandb.log`` calls, the ``run``
record the run's id, the ``exit`` record the exit code ``run.finish`` was given.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_payloads(path: Path):
    """The data of every record in the file, pieces joined."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file (starts {data[:7]!r})"
    pos, pieces = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # zero padding at the end of a block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # preallocated, unwritten space
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pieces = chunk
        elif kind == MIDDLE:
            pieces += chunk
        elif kind == LAST:
            yield pieces + chunk
        else:
            raise AssertionError(f"{path}: unknown record type {kind} at byte {pos - length - HEADER}")


def records(run_dir: Path, kind: str):
    """The ``kind`` records (``history``, ``run``, ``exit``, ...) of the one run file in ``run_dir``."""
    from wandb.proto import wandb_internal_pb2

    files = list(Path(run_dir).glob("run-*.wandb"))
    assert len(files) == 1, f"expected one run-*.wandb in {run_dir}, found {files}"
    for payload in record_payloads(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == kind:
            yield getattr(record, kind)


def run_id(run_dir: Path) -> str:
    """The W&B run id the run's ``run`` record names (every record names the same)."""
    ids = {run.run_id for run in records(run_dir, "run")}
    assert len(ids) == 1, f"{run_dir}: run ids {ids}"
    return ids.pop()


def exit_code(run_dir: Path) -> int:
    """The exit code ``run.finish`` recorded (its ``exit`` record; W&B marks a non-zero one as failed)."""
    codes = [exit.exit_code for exit in records(run_dir, "exit")]
    assert len(codes) == 1, f"{run_dir}: {len(codes)} exit records"
    return codes[0]


def history(run_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of every ``wandb.log`` in the run (W&B's own ``_``-keys left out)."""
    rows: dict[int, dict[str, float]] = {}
    for hist in records(run_dir, "history"):
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in hist.item}
        step = row.pop("_step")
        rows[step] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows
