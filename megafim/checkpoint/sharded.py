"""Global tensors stored as slices, one file per writing rank, with an index saying where each slice
goes: the layout-free view of a sharded model (and of its optimizer state) that any layout can read.

A folder (``model/`` or ``optim/``) holds:

    <shard>.safetensors     the slices one rank holds, under the tensors' global names
    index.json              {"format_version": 2, "metadata": {...},
                             "tensors": {name: {"shape": [global], "dtype": "F32",
                                                "shards": [{"file": "<shard>.safetensors",
                                                            "offset": [per dim]}]}}}

A slice's shape is the one in its file's header; ``offset`` is where it starts in the global tensor.
The slices of a tensor tile it exactly once (``read`` checks the element count). Each writer first
writes ``<shard>.json`` (its own entries); one process merges them into ``index.json`` once every
writer is done (``merge_index``), so no rank ever needs to know another's slices.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from megafim.checkpoint.format import FORMAT_VERSION, CheckpointError
from megafim.checkpoint.safetensors_stream import (_SAFETENSORS_TO_TORCH, SAFETENSORS_DTYPES,
                                                   save_safetensors_streaming, tensor_spec)

INDEX = "index.json"


def write_shard(folder: Path, shard: str, state: Mapping[str, torch.Tensor],
                placement: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> None:
    """Write one rank's slices ``state`` (streamed, one tensor at a time, as they are: no copy; a lazy
    mapping is read one tensor at a time) and its index fragment. ``placement[name]`` is (offset,
    global shape); a name without one is a whole tensor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_streaming(state, folder / f"{shard}.safetensors", metadata={"format": "pt"})
    entries = {}
    for name in state:
        shape, dtype = tensor_spec(state, name)
        offset, global_shape = (placement or {}).get(name, ((0,) * len(shape), shape))
        entries[name] = {"shape": list(global_shape), "dtype": SAFETENSORS_DTYPES[dtype],
                         "offset": list(offset)}
    (folder / f"{shard}.json").write_text(json.dumps(entries) + "\n", encoding="utf-8")


def merge_index(folder: Path, metadata: dict | None = None) -> None:
    """Merge every writer's fragment into ``index.json`` and remove the fragments (one process)."""
    folder = Path(folder)
    tensors: dict[str, dict] = {}
    fragments = sorted(p for p in folder.glob("*.json")
                       if p.name != INDEX and (folder / f"{p.stem}.safetensors").is_file())
    for fragment in fragments:
        for name, entry in json.loads(fragment.read_text(encoding="utf-8")).items():
            merged = tensors.setdefault(name, {"shape": entry["shape"], "dtype": entry["dtype"],
                                               "shards": []})
            merged["shards"].append({"file": f"{fragment.stem}.safetensors", "offset": entry["offset"]})
    data = {"format_version": FORMAT_VERSION, "metadata": metadata or {}, "tensors": tensors}
    (folder / INDEX).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    for fragment in fragments:
        fragment.unlink()


def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["tensors"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete megafim checkpoint)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid shard index ({exc})") from None
    return data


def _region(out: torch.Tensor, offset, shape) -> torch.Tensor:
    """The part of ``out`` a slice of ``shape`` at ``offset`` covers (a view)."""
    region = out
    for dim, (start, size) in enumerate(zip(offset, shape)):
        region = region.narrow(dim, start, size)
    return region


class ShardedState(Mapping):
    """{name: global tensor} over a sharded folder, each tensor assembled from its slices on access
    (one tensor in memory at a time); ``spec(name)`` gives shape and dtype without reading."""

    def __init__(self, folder: Path, readers: dict | None = None) -> None:
        self.folder = Path(folder)
        data = read_index(self.folder)
        self.metadata: dict = data.get("metadata", {})
        self._tensors: dict[str, dict] = data["tensors"]
        self._readers = readers  # {file name: verified_read.VerifyingReader}: checked as they are read

    def finish(self) -> None:
        """With verifying readers: check every file's checksum (``CheckpointError`` naming the file)."""
        for reader in (self._readers or {}).values():
            reader.finish()

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, dtype = self.spec(name)
        if self._readers is None:
            return self.read_slice(name, (0,) * len(shape), shape)
        out = torch.empty(shape, dtype=dtype)
        filled = 0
        for shard in self._tensors[name]["shards"]:  # read (and hashed) straight into its place when contiguous
            reader = self._readers[shard["file"]]
            region = _region(out, shard["offset"], reader.shape_of(name))
            part = reader.get_tensor(name, into=region)
            if part is not region:
                region.copy_(part)
            filled += part.numel()
        self._check_filled(name, filled, out)
        return out

    def read_slice(self, name: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The region ``[offset, offset + shape)`` of the global tensor ``name``, read from the parts of
        the stored slices that overlap it (a rank of another layout reads only what it holds)."""
        out = torch.empty(tuple(shape), dtype=self.spec(name)[1])
        filled = 0
        for shard in self._tensors[name]["shards"]:
            with safe_open(str(self.folder / shard["file"]), framework="pt") as handle:
                part = handle.get_slice(name)
                src, dst = _overlap(shard["offset"], part.get_shape(), offset, shape)
                if src is None:
                    continue
                piece = part[src] if src else handle.get_tensor(name)  # a 0-d tensor has no slices
            out[dst] = piece
            filled += piece.numel()
        self._check_filled(name, filled, out)
        return out

    def _check_filled(self, name: str, filled: int, out: torch.Tensor) -> None:
        if filled != out.numel():
            raise CheckpointError(f"{self.folder / INDEX}: the slices of {name} cover {filled} of "
                                  f"{out.numel()} elements")

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self._tensors[name]
        return tuple(entry["shape"]), _SAFETENSORS_TO_TORCH[entry["dtype"]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _overlap(start, size, want_start, want_size) -> tuple[tuple[slice, ...] | None, tuple[slice, ...]]:
    """(the overlap of a stored slice and a wanted region, in the stored slice's coordinates; the same in
    the region's), or (None, ()) when they do not overlap."""
    src, dst = [], []
    for a, n, b, m in zip(start, size, want_start, want_size):
        lo, hi = max(a, b), min(a + n, b + m)
        if lo >= hi:
            return None, ()
        src.append(slice(lo - a, hi - a))
        dst.append(slice(lo - b, hi - b))
    return tuple(src), tuple(dst)
