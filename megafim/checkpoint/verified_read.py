"""Reading a safetensors file and checking its checksum (``manifest.py``) in one pass: each tensor's
bytes are read once, straight into their place in the model's tensor, and hashed there, instead of
being read once to load and once to verify. With verification off the same reader reads without hashing.

The checksum of a file is a running hash over its bytes in order. Tensors are read in the order asked
for; one that starts where the last read ended (a reader that goes through a file in order, as loading
a model does) extends the running hash; the bytes before it that no one asked for yet (the header, a
skipped tensor) are hashed on the way. A tensor that lies behind the hashed part is read again
without hashing (its bytes were hashed when passed). ``finish`` hashes the rest of the file and
compares; nothing read from a file counts as verified before ``finish`` returns.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import Executor
from pathlib import Path

import torch

from megafim.checkpoint.format import MANIFEST, CheckpointError
from megafim.checkpoint.manifest import ALGORITHM, new_hash
from megafim.checkpoint.safetensors_stream import _SAFETENSORS_TO_TORCH

_BLOCK = 8 << 20


class VerifyingReader:
    """One safetensors file, read tensor by tensor, checked against ``size`` and ``checksum`` (the
    manifest's hex digest of ``algorithm``); ``checksum=None``: read the same way, unchecked (a load
    with verification off)."""

    def __init__(self, path: Path, size: int | None = None, checksum: str | None = None,
                 hasher: Executor | None = None, algorithm: str = ALGORITHM) -> None:
        size = Path(path).stat().st_size if size is None else size
        self.path, self.size, self.expected = Path(path), size, checksum
        self._hash = new_hash(algorithm)
        self._hasher, self._pending = hasher, []  # one worker thread: the updates run in order
        actual = self.path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{self.path}: {actual} bytes, the manifest says {size} "
                                  "(truncated or overwritten)")
        self._fh = open(self.path, "rb", buffering=0)
        raw = self._read_exact(8)
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (header of {n} bytes)")
        header = self._read_exact(n)
        self._hash.update(raw)
        self._hash.update(header)
        self._pos = 8 + n
        self._data_start = 8 + n
        try:
            self.header = json.loads(header)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: header is not JSON ({exc})") from None

    def _read_exact(self, n: int) -> bytes:
        data = self._fh.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: ends early")
        return data

    def _update(self, data) -> None:
        """Extend the running hash by ``data`` (the next bytes of the file), now or in the hasher
        thread, which then runs beside the load's reads; ``data`` must not change after."""
        if self.expected is None:
            return
        if self._hasher is None:
            self._hash.update(data)
        else:
            self._pending.append(self._hasher.submit(self._hash.update, data))

    def _hash_up_to(self, end: int) -> None:
        """Read and hash the bytes from the hashed part's end to ``end``."""
        self._fh.seek(self._pos)
        while self._pos < end:
            block = self._fh.read(min(_BLOCK, end - self._pos))
            if not block:
                raise CheckpointError(f"{self.path}: ends early")
            self._update(block)
            self._pos += len(block)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get_tensor(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name``, read into ``into`` when it is a contiguous tensor of its shape and dtype
        (the destination itself: no second copy), else into a new tensor."""
        try:
            return self._get_tensor(name, into)
        except (KeyError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
            self.finish()  # a corrupt header is reported as the checksum mismatch it is
            raise CheckpointError(f"{self.path}: cannot read {name} ({exc!r})") from None

    def _get_tensor(self, name: str, into: torch.Tensor | None) -> torch.Tensor:
        entry = self.header[name]
        dtype, shape = _SAFETENSORS_TO_TORCH[entry["dtype"]], tuple(entry["shape"])
        begin, end = (self._data_start + x for x in entry["data_offsets"])
        if not self._data_start <= begin <= end <= self.size:
            raise ValueError(f"data_offsets {entry['data_offsets']} outside the file")
        fits = into is not None and into.is_contiguous() and into.dtype == dtype and tuple(into.shape) == shape
        out = into if fits else torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if len(view) != end - begin:
            raise ValueError(f"{shape} {entry['dtype']} is not {end - begin} bytes")
        if begin >= self._pos:
            self._hash_up_to(begin)
        self._fh.seek(begin)
        got = 0
        while got < len(view):
            n = self._fh.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{self.path}: ends early")
            got += n
        if begin == self._pos:
            self._update(view)
            self._pos = end
        return out

    def finish(self) -> None:
        """Hash the rest of the file and compare: ``CheckpointError`` naming the file when it differs."""
        if self.expected is None:
            self._fh.close()
            return
        self._hash_up_to(self.size)
        self._fh.close()
        for update in self._pending:
            update.result()
        self._pending.clear()
        digest = self._hash.hexdigest()
        if digest != self.expected:
            raise CheckpointError(f"{self.path}: checksum {digest} does not match the manifest's "
                                  f"{self.expected} (the file is corrupt)")

    def close(self) -> None:
        self._fh.close()


def readers_for(folder: Path, ckpt_dir: Path, files: dict | None, hasher: Executor | None = None,
                algorithm: str = ALGORITHM) -> dict[str, VerifyingReader]:
    """A reader per ``*.safetensors`` file of ``folder`` that the manifest (its ``files``, checksums of
    ``algorithm``) lists; ``CheckpointError`` naming a listed file that is missing or a file the
    manifest does not list. ``files=None``: an unchecked reader per file there is."""
    folder, ckpt_dir = Path(folder), Path(ckpt_dir)
    if files is None:
        return {path.name: VerifyingReader(path) for path in sorted(folder.glob("*.safetensors"))}
    prefix = folder.relative_to(ckpt_dir).as_posix() + "/"
    listed = sorted(rel for rel in files if rel.startswith(prefix) and rel.endswith(".safetensors")
                    and "/" not in rel[len(prefix):])
    for path in folder.glob("*.safetensors"):
        if path.relative_to(ckpt_dir).as_posix() not in files:
            raise CheckpointError(f"{path}: not listed in {ckpt_dir / MANIFEST}")
    out = {}
    for rel in listed:
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {ckpt_dir / MANIFEST})")
        out[path.name] = VerifyingReader(path, files[rel]["size"], files[rel][algorithm], hasher, algorithm)
    return out
