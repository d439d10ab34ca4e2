"""The .bin/.idx reader and writer: round trips, byte-for-byte compatibility with megatron-core in
both directions, and clear errors on every kind of corrupt file."""

from __future__ import annotations

import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from megafim.data.indexed import (HEADER_BYTES, IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                  optimal_dtype)

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def random_docs(seed: int, n: int, vocab: int, max_seqs: int = 1) -> list[list[np.ndarray]]:
    """n documents, each a list of 1..max_seqs sequences of 0..40 tokens below vocab."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, vocab, size=int(rng.integers(0, 41))) for _ in range(int(rng.integers(1, max_seqs + 1)))]
            for _ in range(n)]


def write_ours(prefix, docs, dtype) -> str:
    with IndexedDatasetBuilder(prefix, dtype=dtype) as b:
        for doc in docs:
            for seq in doc:
                b.add_item(seq)
            b.end_document()
    return str(prefix)


def write_mcore(prefix, docs, dtype) -> str:
    b = mcore.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            b.add_item(torch.from_numpy(np.asarray(seq, dtype=np.int64)))
        b.end_document()
    b.finalize(f"{prefix}.idx")
    return str(prefix)


def read_bytes(prefix) -> tuple[bytes, bytes]:
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 65500), (np.int32, 200_000)])
@pytest.mark.parametrize("max_seqs", [1, 3])
def test_identical_bytes_and_both_directions(tmp_path, dtype, vocab, max_seqs):
    docs = random_docs(0, 60, vocab, max_seqs)
    ours = write_ours(tmp_path / "ours", docs, dtype)
    theirs = write_mcore(tmp_path / "theirs", docs, dtype)
    assert read_bytes(ours) == read_bytes(theirs)
    flat = [seq for doc in docs for seq in doc]
    # ours read by megatron-core
    m = mcore.IndexedDataset(ours)
    assert len(m) == len(flat) and m.index.dtype == dtype
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(m[i], seq)
    # megatron-core's read by ours
    ds = IndexedDataset(theirs, full_check=True)
    assert len(ds) == len(flat) and ds.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds.document_indices, m.document_indices)
    np.testing.assert_array_equal(ds.sequence_pointers, m.index.sequence_pointers)
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(ds[i], seq)
        np.testing.assert_array_equal(ds.get(i), m.get(i))
    for d, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.document(d), np.concatenate(doc).astype(dtype))


def test_sentencepiece_ids_round_trip(tmp_path, small_tokenizer_path):
    """Real token ids (plain sentencepiece) through our writer, megatron-core's reader and ours."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer_path))
    texts = ["def f(x):\n    return x + 1\n", "import os\n\n\nprint(os.sep)\t# tab\n", "π ≈ 3.14159 — ünïcode"]
    docs = [[np.asarray(sp.encode(t))] for t in texts]
    prefix = write_ours(tmp_path / "sp", docs, optimal_dtype(sp.vocab_size()))
    m = mcore.IndexedDataset(prefix)
    ds = IndexedDataset(prefix)
    for i, t in enumerate(texts):
        assert sp.decode(ds[i].tolist()) == t
        assert sp.decode(m[i].tolist()) == t


def test_get_slices_and_pickle(tmp_path):
    docs = [[np.arange(10)], [np.arange(100, 105)], [np.zeros(0, np.int64)]]
    ds = IndexedDataset(write_ours(tmp_path / "d", docs, np.uint16))
    np.testing.assert_array_equal(ds.get(0, offset=3, length=4), [3, 4, 5, 6])
    np.testing.assert_array_equal(ds.get(1, offset=2), [102, 103, 104])
    np.testing.assert_array_equal(ds[-2], np.arange(100, 105))
    assert len(ds[2]) == 0 and [len(s) for s in ds[0:3]] == [10, 5, 0]
    with pytest.raises(IndexError, match="out of range"):
        ds.get(1, offset=3, length=3)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[1], ds[1])
    assert ds.num_tokens == 15 and ds.num_documents == 3


def test_empty_dataset_both_ways(tmp_path):
    ours = write_ours(tmp_path / "ours", [], np.uint16)
    theirs = write_mcore(tmp_path / "theirs", [], np.uint16)
    assert read_bytes(ours) == read_bytes(theirs)  # (megatron-core itself cannot mmap the empty .bin)
    ds = IndexedDataset(ours)
    assert len(ds) == 0 and ds.num_documents == 0 and list(ds.document_indices) == [0]


def test_builder_rejects_ids_outside_dtype_and_leaves_nothing(tmp_path):
    prefix = tmp_path / "bad"
    with pytest.raises(ValueError, match="does not fit uint16"):
        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
            b.add_item([1, 2, 65536])
    with pytest.raises(ValueError, match="negative"):
        with IndexedDatasetBuilder(prefix, dtype=np.int32) as b:
            b.add_item([-1])
    assert os.listdir(tmp_path) == []


def test_add_document_splits_into_sequences(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "d", dtype=np.int32) as b:
        b.add_document(np.arange(10), [3, 0, 7])
        b.add_document([70_000])
        with pytest.raises(ValueError, match="do not split a document of 2 tokens"):
            b.add_document([1, 2], [1, 2])
        with pytest.raises(ValueError, match="must be integers"):
            b.add_item(np.array([1.5]))
    ds = IndexedDataset(tmp_path / "d", full_check=True)
    assert ds.sequence_lengths.tolist() == [3, 0, 7, 1] and ds.document_indices.tolist() == [0, 3, 4]
    np.testing.assert_array_equal(ds.document(0), np.arange(10))
    assert ds.document(1).tolist() == [70_000]


def test_failed_rewrite_keeps_the_old_dataset(tmp_path):
    prefix = write_ours(tmp_path / "d", [[np.arange(5)]], np.uint16)
    before = read_bytes(prefix)
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
            b.add_item(np.arange(7))
            raise RuntimeError("boom")
    assert read_bytes(prefix) == before
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_add_index_merges_and_checks_dtype(tmp_path):
    a = write_ours(tmp_path / "a", random_docs(1, 7, 1000, 2), np.uint16)
    b = write_mcore(tmp_path / "b", random_docs(2, 5, 1000, 3), np.uint16)
    c = write_ours(tmp_path / "c", random_docs(3, 2, 1000), np.int32)
    with IndexedDatasetBuilder(tmp_path / "ab", dtype=np.uint16) as builder:
        builder.add_index(a)
        builder.add_index(b)
    ref = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ref.add_index(a)
    ref.add_index(b)
    ref.finalize(str(tmp_path / "ref.idx"))
    assert read_bytes(tmp_path / "ab") == read_bytes(tmp_path / "ref")
    with pytest.raises(ValueError, match="dtype int32 differs"):
        with IndexedDatasetBuilder(tmp_path / "ac", dtype=np.uint16) as builder:
            builder.add_index(c)


# -- corrupt files ------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> str:
    return write_ours(tmp_path / "good", random_docs(4, 20, 1000, 2), np.uint16)


def corrupt(prefix: str, edit) -> str:
    out = prefix + "_bad"
    shutil.copy(prefix + ".bin", out + ".bin")
    idx = bytearray(open(prefix + ".idx", "rb").read())
    binary = bytearray(open(prefix + ".bin", "rb").read())
    idx, binary = edit(idx, binary)
    open(out + ".idx", "wb").write(bytes(idx))
    open(out + ".bin", "wb").write(bytes(binary))
    return out


def header(idx: bytes) -> tuple:
    return struct.unpack("<9sQBQQ", bytes(idx[:HEADER_BYTES]))


def set_u64(idx: bytearray, at: int, value: int) -> bytearray:
    idx[at:at + 8] = struct.pack("<Q", value)
    return idx


CORRUPTIONS = {
    "truncated header": (lambda i, b: (i[:20], b), r"good_bad\.idx: truncated: 20 bytes"),
    "truncated arrays": (lambda i, b: (i[:-5], b), r"good_bad\.idx: truncated"),
    "trailing bytes": (lambda i, b: (i + b"\0" * 3, b), r"good_bad\.idx: 3 bytes after the document indices"),
    "wrong magic": (lambda i, b: (b"MMIDIDY\0\0" + i[9:], b), r"good_bad\.idx: not a Megatron indexed dataset"),
    "wrong version": (lambda i, b: (set_u64(i, 9, 2), b), r"good_bad\.idx: unsupported version 2"),
    "wrong dtype": (lambda i, b: (i[:17] + bytes([9]) + i[18:], b), r"good_bad\.idx: unknown dtype code 9"),
    "bin too short": (lambda i, b: (i, b[:-2]), r"good_bad\.idx: the last sequence ends at byte \d+ but .*good_bad\.bin"),
    "bin too long": (lambda i, b: (i, b + b"\0\0"), r"the last sequence ends at byte \d+ but .*good_bad\.bin holds"),
    "odd bin size": (lambda i, b: (i, b + b"\0"), r"good_bad\.bin: \d+ bytes is not a whole number of uint16"),
    "pointer past bin": (lambda i, b: (_last_pointer(i, 10**9), b), r"good_bad\.idx: the last sequence ends at byte"),
    "document indices": (lambda i, b: (i[:-8] + struct.pack("<q", 5), b), r"good_bad\.idx: document indices must run"),
}


def _last_pointer(idx: bytearray, value: int) -> bytearray:
    _, _, _, n_seq, _ = header(idx)
    at = HEADER_BYTES + 4 * n_seq + 8 * (n_seq - 1)
    idx[at:at + 8] = struct.pack("<q", value)
    return idx


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_files_fail_clearly(good, case):
    edit, message = CORRUPTIONS[case]
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(corrupt(good, edit))


def test_full_check_finds_inner_inconsistencies(good):
    def swap_pointer(i, b):
        _, _, _, n_seq, _ = header(i)
        at = HEADER_BYTES + 4 * n_seq + 8 * 2
        i[at:at + 8] = struct.pack("<q", 2)
        return i, b

    bad = corrupt(good, swap_pointer)
    IndexedDataset(bad)  # inside the .bin: the checks on open pass; only contiguity is wrong
    with pytest.raises(IndexedDatasetError, match=r"sequence 2 points to byte 2, expected \d+"):
        IndexedDataset(bad, full_check=True)


def _set_sequence(i: bytearray, seq: int, length: int | None = None, pointer: int | None = None) -> bytearray:
    _, _, _, n_seq, _ = header(i)
    if length is not None:
        i[HEADER_BYTES + 4 * seq:HEADER_BYTES + 4 * seq + 4] = struct.pack("<i", length)
    if pointer is not None:
        at = HEADER_BYTES + 4 * n_seq + 8 * seq
        i[at:at + 8] = struct.pack("<q", pointer)
    return i


def _set_document_index(i: bytearray, entry: int, value: int) -> bytearray:
    _, _, _, n_seq, _ = header(i)
    at = HEADER_BYTES + 12 * n_seq + 8 * entry
    i[at:at + 8] = struct.pack("<q", value)
    return i


# Inner entries, not the ends: caught on every open (vectorised), naming the first bad sequence.
INNER_CORRUPTIONS = {
    "pointer past bin": (lambda i, b: (_set_sequence(i, 3, pointer=10**9), b),
                         r"good_bad\.idx: sequence 3 \(document \d+\): \d+ tokens from byte 1000000000 end at byte "
                         r"\d+, past the \d+ bytes of .*good_bad\.bin"),
    "huge pointer": (lambda i, b: (_set_sequence(i, 5, pointer=2**63 - 2), b),
                     r"sequence 5 \(document \d+\): \d+ tokens from byte 9223372036854775806"),
    "huge length": (lambda i, b: (_set_sequence(i, 4, length=2**31 - 1), b),
                    r"sequence 4 \(document \d+\): 2147483647 tokens from byte \d+ end at byte"),
    "negative length": (lambda i, b: (_set_sequence(i, 2, length=-7), b),
                        r"sequence 2 \(document \d+\) has a negative length -7"),
    "negative pointer": (lambda i, b: (_set_sequence(i, 6, pointer=-4), b),
                         r"sequence 6 \(document \d+\) points to byte -4, not a uint16 token's start"),
    "odd pointer": (lambda i, b: (_set_sequence(i, 1, pointer=3), b), r"sequence 1 .* points to byte 3"),
    "decreasing document index": (lambda i, b: (_set_document_index(i, 4, 0), b),
                                  r"good_bad\.idx: document index 4 is 0, less than the \d+ before it"),
}


@pytest.mark.parametrize("case", sorted(INNER_CORRUPTIONS))
def test_corrupt_inner_entries_fail_on_open(good, case):
    edit, message = INNER_CORRUPTIONS[case]
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(corrupt(good, edit))


def test_the_first_bad_sequence_is_named_across_chunks(good, monkeypatch):
    import megafim.data.indexed as indexed

    monkeypatch.setattr(indexed, "RANGE_CHECK_CHUNK", 3)
    bad = corrupt(good, lambda i, b: (_set_sequence(_set_sequence(i, 7, pointer=10**9), 9, length=-1), b))
    with pytest.raises(IndexedDatasetError, match=r"sequence 7 "):
        IndexedDataset(bad)
    bad = corrupt(good, lambda i, b: (_set_document_index(i, 3, 1), b))  # decreases across a chunk edge
    with pytest.raises(IndexedDatasetError, match=r"document index 3 is 1, less than the \d+ before it"):
        IndexedDataset(bad)
    IndexedDataset(good)


def test_missing_files_are_named(good):
    os.remove(good + ".bin")
    with pytest.raises(FileNotFoundError, match=r"good\.bin does not exist"):
        IndexedDataset(good)
