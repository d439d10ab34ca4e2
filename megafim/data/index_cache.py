"""On-disk cache of index arrays, named by a hash of everything that determines them.

A cache file holds a few named numpy arrays. Its name is ``<kind>-<sha256 of the key fields>.mfidx``,
so a changed configuration (dataset, split, seq_length, seed, num_samples, format version...) reads
a different file and never a stale one. The file itself repeats the key hash, so a renamed or
mixed-up file is not trusted either.

Layout (little-endian), documented in ``docs/datasets.md``::

    0   8 bytes  magic b"MFIDXC\\x00\\x00"
    8   u32      format version (CACHE_FORMAT_VERSION)
    12  u32      header length H in bytes
    16  u32      CRC-32 of the header bytes
    20  u32      reserved, 0
    24  H bytes  header: UTF-8 JSON {"key", "fields", "arrays": [{"name", "dtype", "shape",
                 "offset", "nbytes", "crc32"}], "total_size"}
    ... each array's raw C-order bytes at its 64-byte aligned offset; the file ends at total_size.

Loading checks the magic, version, header CRC, key hash, that the file is exactly ``total_size``
bytes, and (unless ``verify_data=False``) each array's CRC-32; anything else is reported as an
invalid cache, which the builder rebuilds and the other ranks refuse.

Distributed use: exactly one process per cache directory builds (``is_builder=True``, usually
global rank 0, or local rank 0 when every node has its own cache directory); the CALLER then runs
``torch.distributed.barrier()``, and every other rank calls again with ``is_builder=False`` to
memory-map the finished file::

    arrays = load_or_build(cache_dir, "gpt", fields, build_fn, is_builder=rank == 0)  # rank 0
    dist.barrier()
    arrays = load_or_build(cache_dir, "gpt", fields, build_fn, is_builder=False)      # others
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"MFIDXC\x00\x00"
CACHE_FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, reserved
_ALIGN = 64
_MAX_HEADER = 1 << 24
SUFFIX = ".mfidx"


class IndexCacheError(RuntimeError):
    """A cache file that is missing or fails a check (the message says which and why)."""


@dataclass(frozen=True)
class CacheEntry:
    """Where the arrays of one index live: ``path`` is None when they were built in memory only."""

    arrays: dict[str, np.ndarray]
    path: Path | None
    key: str


def key_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``fields`` (sorted keys, no whitespace)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"index cache key field of type {type(value).__name__} is not JSON-serialisable")


def dataset_fingerprint(path_prefix: str | os.PathLike, mode: str = "stat") -> dict[str, Any]:
    """What identifies a ``.bin/.idx`` pair for the cache key.

    ``"stat"`` (default, free): the resolved path and the size and modification time of both files,
    so rewriting the dataset in place invalidates its caches. ``"content"``: a BLAKE2b hash of the
    ``.idx`` bytes plus the ``.bin`` size, independent of path and mtime, so copies of one dataset on
    several nodes share cache names (costs one read of the ``.idx``).
    """
    prefix = Path(path_prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for p in (idx, bin_):
        if not p.is_file():
            raise FileNotFoundError(f"indexed dataset file {p} does not exist")
    if mode == "stat":
        si, sb = idx.stat(), bin_.stat()
        return {
            "path": str(prefix.resolve()),
            "idx_size": si.st_size,
            "idx_mtime_ns": si.st_mtime_ns,
            "bin_size": sb.st_size,
            "bin_mtime_ns": sb.st_mtime_ns,
        }
    if mode == "content":
        digest = hashlib.blake2b(digest_size=32)
        with open(idx, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return {"idx_blake2b": digest.hexdigest(), "bin_size": bin_.stat().st_size}
    raise ValueError(f"fingerprint mode must be 'stat' or 'content', got {mode!r}")


def cache_path(cache_dir: str | os.PathLike, kind: str, key: str) -> Path:
    return Path(cache_dir) / f"{kind}-{key[:40]}{SUFFIX}"


def _crc32(array: np.ndarray) -> int:
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    crc, step = 0, 1 << 26  # in 64 MiB steps so a memory-mapped array is not read all at once
    for start in range(0, len(view), step):
        crc = zlib.crc32(view[start : start + step], crc)
    return crc


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def write_cache(path: Path, key: str, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    table = [{"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": a.nbytes,
              "crc32": _crc32(a)} for name, a in arrays.items()]
    # The header lists the arrays' offsets, which depend on the header's length: place the data
    # after the header and grow the start until the header fits (one or two rounds).
    data_start = 0
    while True:
        offset = data_start
        for entry in table:
            entry["offset"] = offset
            offset = _align(offset + entry["nbytes"])
        total = offset
        header = json.dumps({"key": key, "fields": fields, "arrays": table, "total_size": total},
                            sort_keys=True, default=_json_default).encode("utf-8")
        needed = _align(_PREFIX.size + len(header))
        if needed <= data_start:
            break
        data_start = needed
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, CACHE_FORMAT_VERSION, len(header), zlib.crc32(header), 0))
            f.write(header)
            for entry, a in zip(table, arrays.values()):
                f.write(b"\x00" * (entry["offset"] - f.tell()))
                f.write(memoryview(a).cast("B"))
            f.write(b"\x00" * (total - f.tell()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def read_cache(path: Path, key: str, verify_data: bool = True) -> dict[str, np.ndarray]:
    """Memory-map the arrays of a cache file, or raise IndexCacheError saying what is wrong."""
    if not path.is_file():
        raise IndexCacheError(f"index cache {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise IndexCacheError(f"index cache {path} is truncated ({size} bytes)")
        magic, version, header_len, header_crc, _ = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise IndexCacheError(f"index cache {path} has a bad magic {magic!r}")
        if version != CACHE_FORMAT_VERSION:
            raise IndexCacheError(f"index cache {path} has format version {version}, expected "
                                  f"{CACHE_FORMAT_VERSION}")
        if header_len > min(_MAX_HEADER, size - _PREFIX.size):
            raise IndexCacheError(f"index cache {path} is truncated or has a bad header length")
        header_bytes = f.read(header_len)
    if zlib.crc32(header_bytes) != header_crc:
        raise IndexCacheError(f"index cache {path} has a corrupt header (CRC mismatch)")
    try:
        header = json.loads(header_bytes)
    except ValueError as err:
        raise IndexCacheError(f"index cache {path} has an unreadable header ({err})") from err
    if header.get("key") != key:
        raise IndexCacheError(f"index cache {path} was built for key {header.get('key')}, not {key}")
    if header["total_size"] != size:
        raise IndexCacheError(f"index cache {path} is {size} bytes, its header says {header['total_size']}")
    arrays = {}
    for entry in header["arrays"]:
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != entry["nbytes"] or \
                entry["offset"] + entry["nbytes"] > size:
            raise IndexCacheError(f"index cache {path}: array {entry['name']} does not fit the file")
        if entry["nbytes"] == 0:
            a = np.zeros(shape, dtype)
        else:
            a = np.memmap(path, dtype=dtype, mode="r", offset=entry["offset"], shape=shape)
        if verify_data and _crc32(a) != entry["crc32"]:
            raise IndexCacheError(f"index cache {path}: array {entry['name']} is corrupt (CRC mismatch)")
        arrays[entry["name"]] = a
    return arrays


def load_or_build(
    cache_dir: str | os.PathLike | None,
    kind: str,
    fields: Mapping[str, Any],
    build: Callable[[], Mapping[str, np.ndarray]],
    is_builder: bool | Callable[[], bool] = True,
    verify_data: bool = True,
) -> CacheEntry:
    """Return the arrays for ``fields``: from the cache when it is valid, else built by ``build``.

    With ``cache_dir=None`` the arrays are built in memory on every call. Otherwise the builder
    (``is_builder`` true, or a callable returning true) loads a valid cache file or builds, writes
    and loads one; a non-builder only loads, and raises IndexCacheError when the file is missing or
    invalid (the caller forgot the build-then-barrier step, or the builder saw a different config).
    """
    fields = {"cache_format": CACHE_FORMAT_VERSION, **fields}
    key = key_hash(fields)
    if cache_dir is None:
        return CacheEntry({k: np.asarray(v) for k, v in build().items()}, None, key)
    path = cache_path(cache_dir, kind, key)
    builder = is_builder() if callable(is_builder) else bool(is_builder)
    try:
        return CacheEntry(read_cache(path, key, verify_data), path, key)
    except IndexCacheError as err:
        if not builder:
            raise IndexCacheError(
                f"{err}. Only the builder process writes index caches: call with is_builder=True on "
                "one rank (rank 0), then torch.distributed.barrier(), then load on the other ranks "
                "with the same configuration."
            ) from err
        if path.exists():
            logger.warning("rebuilding invalid index cache: %s", err)
    logger.info("building %s index %s", kind, path.name)
    write_cache(path, key, fields, build())
    return CacheEntry(read_cache(path, key, verify_data=False), path, key)
