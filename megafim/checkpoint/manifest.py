"""``manifest.json``: the size and CRC-32 of every file of a checkpoint, written last by the commit.

Its presence says the save finished; its checksums catch a file that was truncated, overwritten or
corrupted since (a bad disk, a partial copy between clusters). CRC-32 (zlib) reads at several GB/s
and zlib releases the GIL on large buffers, so files are hashed in parallel threads, 8 MiB at a time
(benchmarks/checkpoint_verify.py measures the cost against a load).

    {"format_version": 2, "algorithm": "crc32",
     "files": {"ds/mp_rank_00_model_states.pt": {"size": 123, "crc32": "89abcdef"}, ...}}

Paths are relative to the checkpoint directory, with ``/`` separators; the manifest lists every file
of the checkpoint except itself.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megafim.checkpoint.format import FORMAT_VERSION, MANIFEST, CheckpointError

ALGORITHM = "crc32"
_BLOCK = 8 << 20


def crc32_file(path: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits."""
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _files_of(ckpt_dir: Path) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(ckpt_dir):
        for name in files:
            rel = Path(root, name).relative_to(ckpt_dir).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write(ckpt_dir: Path) -> dict:
    """Hash every file under ``ckpt_dir`` and write ``manifest.json`` (call after all files are written)."""
    ckpt_dir = Path(ckpt_dir)
    names = _files_of(ckpt_dir)
    with ThreadPoolExecutor(_threads()) as pool:
        sums = list(pool.map(lambda rel: crc32_file(ckpt_dir / rel), names))
    files = {rel: {"size": (ckpt_dir / rel).stat().st_size, ALGORITHM: crc} for rel, crc in zip(names, sums)}
    data = {"format_version": FORMAT_VERSION, "algorithm": ALGORITHM, "files": files}
    (ckpt_dir / MANIFEST).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


def read(ckpt_dir: Path) -> dict | None:
    """The manifest of a checkpoint, or ``None`` when it has none (format version 1)."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"algorithm {data.get('algorithm')!r}, expected {ALGORITHM!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid checkpoint manifest ({exc})") from None
    return data


def verify(ckpt_dir: Path, only: Iterable[str] | None = None) -> bool:
    """Check the files (all, or the relative paths in ``only``) against the manifest.

    Returns ``False`` when the checkpoint has no manifest (an older format: nothing to check against);
    raises ``CheckpointError`` naming the first file that is missing, has another size or checksum."""
    ckpt_dir = Path(ckpt_dir)
    data = read(ckpt_dir)
    if data is None:
        return False
    files = data["files"]
    names = sorted(files) if only is None else sorted(set(only))
    for rel in names:
        if rel not in files:
            raise CheckpointError(f"{ckpt_dir / rel}: not listed in {ckpt_dir / MANIFEST}")
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {ckpt_dir / MANIFEST})")
        if path.stat().st_size != files[rel]["size"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                                  f"{files[rel]['size']} (truncated or overwritten)")
    with ThreadPoolExecutor(_threads()) as pool:
        sums = list(pool.map(lambda rel: crc32_file(ckpt_dir / rel), names))
    for rel, crc in zip(names, sums):
        if crc != files[rel][ALGORITHM]:
            raise CheckpointError(f"{ckpt_dir / rel}: checksum {crc} does not match the manifest's "
                                  f"{files[rel][ALGORITHM]} (the file is corrupt)")
    return True


def files_under(ckpt_dir: Path, prefix: str) -> list[str]:
    """The manifest's files whose path starts with ``prefix`` (``"model/"``: the layout-free weights),
    for a reader that verifies only what it reads; empty when there is no manifest."""
    data = read(ckpt_dir)
    return [] if data is None else [rel for rel in data["files"] if rel.startswith(prefix)]
