"""Megatron-LM's indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``), read and written byte for byte.

``IndexedDataset`` memory-maps both files and checks them before use (magic, version, dtype code, array
sizes against the ``.idx`` size, pointers and lengths against the ``.bin`` size), failing with an
error that names the file. ``IndexedDatasetBuilder`` writes through the streaming C++ writer
(``csrc/indexed_writer.h``): bounded memory, temporary names, renamed into place by ``finalize``,
under the prefix's lock (``megafim/data/output_lock.py``).
The layout is documented in ``docs/data_format.md``; datasets made by Megatron-LM's tools load here
and ours load in ``megatron.core.datasets.indexed_dataset.IndexedDataset``.
"""

from __future__ import annotations

import glob
import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np

from megafim.data.output_lock import OutputLock

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 34  # magic (9) + version <Q (8) + dtype code <B (1) + sequence count <Q (8) + document count <Q (8)

# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py); tokens are uint16 or int32.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
RANGE_CHECK_CHUNK = 1 << 16  # index entries checked at once on open: temporaries stay in the cache
UINT16_VOCAB_LIMIT = 65500  # Megatron's DType.optimal_dtype: uint16 below this vocabulary size


class IndexedDatasetError(ValueError):
    """A ``.bin/.idx`` pair that cannot be read; the message names the file and what is wrong."""


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits with room to spare (as Megatron-LM decides), else int32."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def resolve_dataset_prefix(path: str | os.PathLike, what: str = "data path") -> str:
    """The dataset prefix a user means by ``path``: the prefix itself, or its ``.bin`` or ``.idx`` file.

    When no dataset is there, raises ``FileNotFoundError`` with one line that starts with ``what`` (the
    flag or field the path came from, e.g. ``--data-path``) and says what is missing, suggesting
    ``<path>_text_document`` (or another ``<path>_<key>_document``) when that is what exists.
    """
    given = os.fspath(path)
    if IndexedDataset.exists(given):
        return given
    stem, suffix = os.path.splitext(given)
    if suffix in (".bin", ".idx") and IndexedDataset.exists(stem):
        return stem
    prefix = stem if suffix in (".bin", ".idx") else given
    raise FileNotFoundError(f"{what} {given}: {_why_no_dataset(prefix)}")


def _why_no_dataset(prefix: str) -> str:
    have = [s for s in (".bin", ".idx") if os.path.isfile(prefix + s)]
    if len(have) == 1:
        other = ".idx" if have == [".bin"] else ".bin"
        return f"{prefix}{have[0]} exists but {prefix}{other} does not (an incomplete copy?)"
    if os.path.isdir(prefix):
        found = [p[:-4] for p in sorted(glob.glob(glob.escape(prefix) + "/*.idx")) if os.path.isfile(p[:-4] + ".bin")]
        listing = f": it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}" if found else ""
        return f"is a directory; give a dataset prefix (the .bin/.idx path without its suffix){listing}"
    keyed = [p[:-4] for p in sorted(glob.glob(glob.escape(prefix) + "_*_document.idx"))
             if os.path.isfile(p[:-4] + ".bin")]
    keyed.sort(key=lambda p: not p.endswith("_text_document"))  # the default key first
    if keyed:
        return (f"no {prefix}.bin/.idx; did you mean {keyed[0]}? (preprocess_data.py writes "
                "<output-prefix>_<key>_document)")
    return f"no dataset: neither {prefix}.bin nor {prefix}.idx exists"


class IndexedDataset:
    """A validated, memory-mapped ``.bin/.idx`` pair: ``len(ds)`` sequences of token ids.

    Opening checks that every sequence lies inside the ``.bin`` (its pointer and length) and that the
    document indices never decrease. ``full_check=True`` also checks that the sequences are contiguous
    (every pointer equals the running sum of the lengths before it).
    """

    def __init__(self, path_prefix: str | os.PathLike, full_check: bool = False) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self._full_check = full_check
        self._open()

    def _open(self) -> None:
        idx, bin_ = idx_path(self.path_prefix), bin_path(self.path_prefix)
        for p in (idx, bin_):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"indexed dataset file {p} does not exist")
        idx_size = os.path.getsize(idx)
        if idx_size < HEADER_BYTES:
            raise IndexedDatasetError(f"{idx}: truncated: {idx_size} bytes, shorter than the {HEADER_BYTES}-byte header")
        with open(idx, "rb") as f:
            header = f.read(HEADER_BYTES)
        # 9s magic b"MMIDIDX\x00\x00" | <Q version (1) | <B dtype code | <Q sequence count S | <Q document
        # count D; then int32[S] lengths, int64[S] byte pointers, int64[D] document indices (docs/data_format.md)
        magic, version, code, n_seq, n_doc = struct.unpack("<9sQBQQ", header)
        if magic != INDEX_MAGIC:
            raise IndexedDatasetError(f"{idx}: not a Megatron indexed dataset (magic {magic!r}, expected {INDEX_MAGIC!r})")
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{idx}: unsupported version {version} (expected {INDEX_VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc
        if idx_size < expected:
            raise IndexedDatasetError(
                f"{idx}: truncated: {idx_size} bytes, but {n_seq} sequences and {n_doc} document indices need {expected}")
        if idx_size > expected:
            extra = "(per-sequence modes of a multimodal dataset, not supported)" if idx_size - expected == n_seq else ""
            raise IndexedDatasetError(f"{idx}: {idx_size - expected} bytes after the document indices {extra}".rstrip())
        # Plain ndarray views of the maps (they keep the maps alive), as megatron-core's reader returns.
        index = np.memmap(idx, dtype=np.uint8, mode="r").view(np.ndarray)
        self._index_map = index
        self.sequence_lengths = index[HEADER_BYTES:HEADER_BYTES + 4 * n_seq].view(np.int32)
        self.sequence_pointers = index[HEADER_BYTES + 4 * n_seq:HEADER_BYTES + 12 * n_seq].view(np.int64)
        self.document_indices = index[HEADER_BYTES + 12 * n_seq:expected].view(np.int64)
        bin_size = os.path.getsize(bin_)
        self._bin = np.memmap(bin_, dtype=np.uint8, mode="r").view(np.ndarray) if bin_size else np.zeros(0, np.uint8)
        self._check_arrays(idx, bin_, bin_size)
        if self._full_check:
            self.check_all()

    def _check_arrays(self, idx: str, bin_: str, bin_size: int) -> None:
        n_seq, item = len(self.sequence_lengths), self.dtype.itemsize
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != n_seq:
            first = int(docs[0]) if len(docs) else None
            last = int(docs[-1]) if len(docs) else None
            raise IndexedDatasetError(f"{idx}: document indices must run from 0 to the sequence count {n_seq}, "
                                      f"found first {first} and last {last}")
        if bin_size % item:
            raise IndexedDatasetError(f"{bin_}: {bin_size} bytes is not a whole number of {self.dtype} tokens")
        end = 0
        if n_seq:
            if self.sequence_pointers[0] != 0:
                raise IndexedDatasetError(f"{idx}: the first sequence pointer is {int(self.sequence_pointers[0])}, not 0")
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * item
        if end != bin_size:
            raise IndexedDatasetError(f"{idx}: the last sequence ends at byte {end} but {bin_} holds {bin_size} bytes")
        self._check_ranges(idx, bin_, bin_size)

    def _check_ranges(self, idx: str, bin_: str, bin_size: int) -> None:
        """Every sequence lies inside the ``.bin``, and document indices never decrease.

        Reductions (min, max, or) over cache-sized chunks of ``RANGE_CHECK_CHUNK`` entries, one small
        temporary each; only a failing chunk is looked at entry by entry. Cheap enough for every open:
        docs/data_format.md has the numbers.
        """
        item, chunk = self.dtype.itemsize, RANGE_CHECK_CHUNK
        for s in range(0, len(self.sequence_lengths), chunk):
            lengths, pointers = self.sequence_lengths[s:s + chunk], self.sequence_pointers[s:s + chunk]
            if len(lengths) == 0:
                break
            # pointers <= bin_size first, so that pointer + length * item cannot overflow below
            ok = (lengths.min() >= 0 and pointers.min() >= 0 and pointers.max() <= bin_size
                  and not np.bitwise_or.reduce(pointers) & (item - 1))  # itemsize is a power of 2
            if ok:
                ends = np.multiply(lengths, item, dtype=np.int64)
                ends += pointers
                ok = ends.max() <= bin_size
            if not ok:
                lengths = lengths.astype(np.int64)
                bad = (lengths < 0) | (pointers < 0) | (pointers % item != 0) | (pointers > bin_size - lengths * item)
                self._raise_bad_sequence(idx, bin_, bin_size, s + int(np.argmax(bad)))
        docs = self.document_indices
        for s in range(1, len(docs), chunk):
            d = docs[s - 1:s + chunk]
            if (d[1:] < d[:-1]).any():
                at = s + int(np.argmax(d[1:] < d[:-1]))
                raise IndexedDatasetError(f"{idx}: document index {at} is {int(docs[at])}, less than the "
                                          f"{int(docs[at - 1])} before it (document indices never decrease)")

    def _raise_bad_sequence(self, idx: str, bin_: str, bin_size: int, i: int) -> None:
        length, pointer = int(self.sequence_lengths[i]), int(self.sequence_pointers[i])
        document = int(np.searchsorted(self.document_indices, i, side="right")) - 1
        where = f"{idx}: sequence {i} (document {document})"
        if length < 0:
            raise IndexedDatasetError(f"{where} has a negative length {length}")
        if pointer < 0 or pointer % self.dtype.itemsize:
            raise IndexedDatasetError(f"{where} points to byte {pointer}, not a {self.dtype} token's start")
        raise IndexedDatasetError(f"{where}: {length} tokens from byte {pointer} end at byte "
                                  f"{pointer + length * self.dtype.itemsize}, past the {bin_size} bytes of {bin_} "
                                  "(is the .idx from another .bin?)")

    def check_all(self, chunk: int = 1 << 22) -> None:
        """Check every length, pointer and document index (in chunks: memory stays small)."""
        idx, item = idx_path(self.path_prefix), self.dtype.itemsize
        at = 0
        for s in range(0, len(self.sequence_lengths), chunk):
            lengths = np.asarray(self.sequence_lengths[s:s + chunk], dtype=np.int64)
            if (lengths < 0).any():
                bad = s + int(np.argmax(lengths < 0))
                raise IndexedDatasetError(f"{idx}: sequence {bad} has negative length {int(lengths[bad - s])}")
            expect = at + np.concatenate([[0], np.cumsum(lengths[:-1] * item)])
            wrong = np.nonzero(np.asarray(self.sequence_pointers[s:s + chunk]) != expect)[0]
            if len(wrong):
                i = s + int(wrong[0])
                raise IndexedDatasetError(f"{idx}: sequence {i} points to byte {int(self.sequence_pointers[i])}, "
                                          f"expected {int(expect[wrong[0]])} (sequences must be contiguous)")
            at = int(expect[-1] + lengths[-1] * item)
        prev = 0
        for s in range(0, len(self.document_indices), chunk):
            d = np.asarray(self.document_indices[s:s + chunk])
            if len(d) and (d[0] < prev or (np.diff(d) < 0).any()):
                raise IndexedDatasetError(f"{idx}: document indices decrease near entry {s}")
            prev = int(d[-1]) if len(d) else prev

    # -- access ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous (step 1)")
            return [self.get(i) for i in range(start, stop)]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (a read-only view of the map)."""
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {idx} out of range for {self.path_prefix} with {n} sequences")
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {seq_len}")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return self._bin[start:start + length * self.dtype.itemsize].view(self.dtype)

    @property
    def num_tokens(self) -> int:
        return len(self._bin) // self.dtype.itemsize

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences, concatenated)."""
        s0, s1 = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if s1 == s0:
            return np.zeros(0, self.dtype)
        start = int(self.sequence_pointers[s0])
        end = int(self.sequence_pointers[s1 - 1]) + int(self.sequence_lengths[s1 - 1]) * self.dtype.itemsize
        return self._bin[start:end].view(self.dtype)

    @staticmethod
    def exists(path_prefix: str | os.PathLike) -> bool:
        return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))

    # Pickled by prefix (DataLoader workers re-open the maps themselves).
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path_prefix, self._full_check)

    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path_prefix, self._full_check = state
        self._open()

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
                f"dtype={self.dtype})")


class IndexedDatasetBuilder:
    """Writes ``<prefix>.bin/.idx`` in a streaming way (memory does not grow with the dataset).

    Use as a context manager, or call ``finalize()``; on an exception (or ``abort()``) the temporary
    files are removed and an existing dataset at ``prefix`` is left as it was.
    """

    def __init__(self, path_prefix: str | os.PathLike, dtype: type[np.number] | np.dtype = np.uint16) -> None:
        from megafim._native import load

        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.int32)):
            raise ValueError(f"token dtype {self.dtype}: must be uint16 or int32")
        self.path_prefix = os.fspath(path_prefix)
        Path(self.path_prefix).parent.mkdir(parents=True, exist_ok=True)
        # One writer per prefix at a time (released by finalize/abort, or by the kernel at exit).
        self._lock = OutputLock(self.path_prefix).acquire()
        try:
            self._writer = load("indexed_builder").IndexedWriter(self.path_prefix, CODE_OF_DTYPE[self.dtype])
        except BaseException:
            self._lock.release()
            raise

    def add_item(self, tokens) -> None:
        """Append one sequence (ids must fit the dtype)."""
        self._writer.add_sequence(_as_int32(tokens))

    def end_document(self) -> None:
        """End the current document (the sequences added since the previous end)."""
        self._writer.end_document()

    def add_document(self, tokens, lengths: list[int] | None = None) -> None:
        """Append a document: ``tokens`` split into sequences of ``lengths`` (default: one sequence)."""
        tokens = _as_int32(tokens)
        if lengths is None:
            lengths = [len(tokens)]
        if sum(lengths) != len(tokens) or any(n < 0 for n in lengths):
            raise ValueError(f"sequence lengths {lengths} do not split a document of {len(tokens)} tokens")
        at = 0
        for n in lengths:
            self._writer.add_sequence(tokens[at:at + n])
            at += n
        self._writer.end_document()

    def add_index(self, path_prefix: str | os.PathLike) -> None:
        """Append a whole dataset (checked in full first; its dtype must match)."""
        other = IndexedDataset(path_prefix, full_check=True)
        if other.dtype != self.dtype:
            raise ValueError(f"{idx_path(path_prefix)}: dtype {other.dtype} differs from the output's {self.dtype}")
        n_seq, n_doc = len(other), len(other.document_indices)
        del other  # unmap before copying
        self._writer.append_dataset(os.fspath(path_prefix), n_seq, n_doc)

    def finalize(self) -> None:
        """Write the ``.idx`` and move both files into place."""
        try:
            self._writer.commit()
        finally:
            self._lock.release()

    def abort(self) -> None:
        try:
            self._writer.abort()
        finally:
            self._lock.release()

    @property
    def num_documents(self) -> int:
        return self._writer.num_documents

    @property
    def num_tokens(self) -> int:
        return self._writer.num_tokens

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _as_int32(tokens) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids must fit int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


def find_datasets(directory: str | os.PathLike) -> list[str]:
    """The prefixes of every ``.bin/.idx`` pair in ``directory``, sorted by name."""
    d = Path(directory)
    prefixes = sorted(str(p.with_suffix("")) for p in d.glob("*.idx") if p.with_suffix(".bin").is_file())
    if not prefixes:
        raise FileNotFoundError(f"{d}: no .bin/.idx pairs found")
    return prefixes


def merge_datasets(prefixes: list[str], output_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate datasets (documents in the order given) into ``output_prefix``, streaming.

    Every input is checked in full, and their dtypes must agree, before anything is written.
    """
    if not prefixes:
        raise ValueError("merge: no input datasets")
    out = os.fspath(output_prefix)
    if out in [os.fspath(p) for p in prefixes]:
        raise ValueError(f"merge: the output {out} is also an input")
    dtypes = {}
    for p in prefixes:
        dtypes[os.fspath(p)] = IndexedDataset(p, full_check=True).dtype
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{p} ({t})" for p, t in dtypes.items())
        raise ValueError(f"merge: the inputs' token dtypes differ: {listing}")
    with IndexedDatasetBuilder(out, dtype=next(iter(dtypes.values()))) as builder:
        for p in prefixes:
            builder.add_index(p)
    return IndexedDataset(out)
