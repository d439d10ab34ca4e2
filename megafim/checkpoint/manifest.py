"""``manifest.json``: the size and checksum of every file of a checkpoint, written last by the commit.

Its presence says the save finished; its checksums catch a file that was truncated, overwritten or
corrupted since (a bad disk, a partial copy between clusters). The checksum is XXH3's 64-bit hash
(``xxh3_64``, seed 0, 16 hex digits, most significant first: ``xxhash.xxh3_64(data).hexdigest()``),
which runs at about 10 GiB/s on one core, five times zlib's CRC-32; manifests written before it
(``"algorithm": "crc32"``, 8 hex digits of zlib's CRC-32, or no algorithm named) still verify. Files
are hashed in parallel threads, 8 MiB at a time (benchmarks/checkpoint_verify.py measures the cost
against a load).

    {"format_version": 2, "algorithm": "xxh3_64",
     "files": {"ds/mp_rank_00_model_states.pt": {"size": 123, "xxh3_64": "0123456789abcdef"}, ...}}

Paths are relative to the checkpoint directory, with ``/`` separators; the manifest lists every file
of the checkpoint except itself. Each file's entry holds its checksum under the algorithm's name.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from megafim.checkpoint.format import FORMAT_VERSION, MANIFEST, CheckpointError

ALGORITHM = "xxh3_64"
"""What new manifests use."""
OLD_ALGORITHM = "crc32"
"""What manifests written before ``ALGORITHM`` use, named or not."""
_BLOCK = 8 << 20


class Crc32:
    """zlib's CRC-32 with ``hashlib``'s ``update`` / ``hexdigest`` (8 hex digits)."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def hexdigest(self) -> str:
        return f"{self._crc & 0xFFFFFFFF:08x}"


HASHES = {ALGORITHM: xxhash.xxh3_64, OLD_ALGORITHM: Crc32}
"""{algorithm: a new running hash with ``update(bytes-like)`` and ``hexdigest()``}."""


def new_hash(algorithm: str = ALGORITHM):
    return HASHES[algorithm]()


def checksum_file(path: Path, algorithm: str = ALGORITHM) -> str:
    """The checksum of a file's bytes, as the manifest writes it."""
    running = new_hash(algorithm)
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            running.update(view[:n])
    return running.hexdigest()


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
        sums = list(pool.map(lambda rel: checksum_file(ckpt_dir / rel), names))
    files = {rel: {"size": (ckpt_dir / rel).stat().st_size, ALGORITHM: sum_}
             for rel, sum_ in zip(names, sums)}
    data = {"format_version": FORMAT_VERSION, "algorithm": ALGORITHM, "files": files}
    (ckpt_dir / MANIFEST).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


def read(ckpt_dir: Path) -> dict | None:
    """The manifest of a checkpoint, or ``None`` when it has none (format version 1). Its
    ``"algorithm"`` is set (``OLD_ALGORITHM`` where the manifest names none) and every file's entry
    holds a checksum under that name."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        algorithm = data.setdefault("algorithm", OLD_ALGORITHM)
        if algorithm not in HASHES:
            raise ValueError(f"algorithm {algorithm!r}, expected one of {sorted(HASHES)}")
        if not isinstance(files, dict):
            raise ValueError("files is not a mapping")
        for rel, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get(algorithm), str):
                raise ValueError(f"{rel}: no size and {algorithm}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
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
    files, algorithm = data["files"], data["algorithm"]
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
        sums = list(pool.map(lambda rel: checksum_file(ckpt_dir / rel, algorithm), names))
    for rel, sum_ in zip(names, sums):
        if sum_ != files[rel][algorithm]:
            raise CheckpointError(f"{ckpt_dir / rel}: checksum {sum_} does not match the manifest's "
                                  f"{files[rel][algorithm]} ({algorithm}; the file is corrupt)")
    return True


def files_under(ckpt_dir: Path, prefix: str) -> list[str]:
    """The manifest's files whose path starts with ``prefix`` (``"model/"``: the layout-free weights),
    for a reader that verifies only what it reads; empty when there is no manifest."""
    data = read(ckpt_dir)
    return [] if data is None else [rel for rel in data["files"] if rel.startswith(prefix)]
