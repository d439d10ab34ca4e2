"""Lazily produced tensors and a safetensors writer that holds one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. A converter that
writes a whole model into one file (a converted checkpoint's ``model/tp00_pp00.safetensors``)
would then hold the whole model. The format is simple enough to write in a stream: the header
lists every tensor's dtype, shape and byte range, so it needs only the shapes up front; the data
follows tensor by tensor.

File layout (https://github.com/huggingface/safetensors, "Format"):
    8 bytes      little-endian u64 N, the header's length
    N bytes      JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
                 "__metadata__": {str: str}}, padded with spaces to a multiple of 8
    the data     each tensor's bytes (row-major, little-endian) at [begin, end) after the header
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_SAFETENSORS_TO_TORCH = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSource:
    """A tensor known by its shape and dtype, produced only when ``load()`` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


class LazyState(Mapping):
    """{name: tensor} whose tensors are produced on access, one at a time; ``spec(name)`` gives the
    shape and dtype without producing the tensor."""

    def __init__(self, sources: dict[str, TensorSource]) -> None:
        self._sources = sources

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._sources[name]
        tensor = source.load()
        if tuple(tensor.shape) != source.shape or tensor.dtype != source.dtype:
            raise ValueError(f"tensor {name}: produced {tuple(tensor.shape)} {tensor.dtype}, announced "
                             f"{source.shape} {source.dtype}")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._sources[name].shape, self._sources[name].dtype


def tensor_spec(state: Mapping[str, torch.Tensor], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of ``state[name]``, without loading it when the mapping can say so."""
    spec = getattr(state, "spec", None)
    if spec is not None:
        return spec(name)
    tensor = state[name]
    return tuple(tensor.shape), tensor.dtype


def save_safetensors_streaming(state: Mapping[str, torch.Tensor], path: str | Path,
                               metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` as one safetensors file, loading and writing one tensor at a time."""
    names = list(state)
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in names:
        shape, dtype = tensor_spec(state, name)
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name}: dtype {dtype} has no safetensors code")
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            tensor = state[name].detach().cpu().contiguous()
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != expected:
                raise ValueError(f"tensor {name}: {data.nbytes} bytes produced, {expected} announced")
            fh.write(memoryview(data))
            del tensor, data


class LazySafetensors(Mapping):
    """{name: tensor} over every ``*.safetensors`` file in a directory, read on access."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                self._where.update({k: f for k in handle.keys()})

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype from the file's header, without reading the tensor."""
        with safe_open(str(self._where[key]), framework="pt") as handle:
            sliced = handle.get_slice(key)
            return tuple(sliced.get_shape()), _SAFETENSORS_TO_TORCH[sliced.get_dtype()]

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
