"""The index cache: reuse, a new file for every changed field, corrupt files rebuilt, rank 0 builds."""

import os
import shutil
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from megafim.data import index_cache
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec
from megafim.data.index_cache import IndexCacheError, load_or_build, read_cache
from tests.data.gpt_fixtures import open_dataset, random_documents, write_dataset

ARRAYS = {"a": np.arange(1000, dtype=np.int32), "b": np.arange(30, dtype=np.int64).reshape(15, 2),
          "empty": np.zeros(0, dtype=np.int16)}


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return ARRAYS


def test_round_trip_and_reuse(tmp_path):
    build = Counter()
    first = load_or_build(tmp_path, "t", {"x": 1}, build)
    second = load_or_build(tmp_path, "t", {"x": 1}, build, is_builder=False)
    assert build.calls == 1 and first.path == second.path
    for name, a in ARRAYS.items():
        np.testing.assert_array_equal(second.arrays[name], a)
        assert second.arrays[name].dtype == a.dtype
    assert isinstance(second.arrays["a"], np.memmap)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary files left
    assert load_or_build(tmp_path, "t", {"x": 2}, build).path != first.path and build.calls == 2


def test_in_memory_without_cache_dir():
    build = Counter()
    entry = load_or_build(None, "t", {"x": 1}, build)
    assert entry.path is None and build.calls == 1
    load_or_build(None, "t", {"x": 1}, build)
    assert build.calls == 2


def _corruptions():
    def flip_data(data):  # one bit of the last array byte region
        data[-70] ^= 1

    def truncate(data):
        del data[-10:]

    def bad_magic(data):
        data[0:8] = b"NOTMFIDX"

    def bad_version(data):
        data[8:12] = struct.pack("<I", 99)

    def bad_header(data):
        data[40] ^= 0xFF

    def append(data):
        data += b"\0" * 64

    return [flip_data, truncate, bad_magic, bad_version, bad_header, append]


@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda f: f.__name__)
def test_corrupt_cache_is_rebuilt_not_trusted(tmp_path, corrupt):
    build = Counter()
    path = load_or_build(tmp_path, "t", {"x": 1}, build).path
    data = bytearray(path.read_bytes())
    corrupt(data)
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCacheError, match="barrier"):  # another rank refuses it
        load_or_build(tmp_path, "t", {"x": 1}, build, is_builder=False)
    entry = load_or_build(tmp_path, "t", {"x": 1}, build)  # the builder rebuilds it
    assert build.calls == 2
    np.testing.assert_array_equal(entry.arrays["a"], ARRAYS["a"])
    read_cache(path, entry.key)  # valid again


def test_missing_cache_on_a_non_builder_says_what_to_do(tmp_path):
    with pytest.raises(IndexCacheError, match="does not exist.*is_builder=True"):
        load_or_build(tmp_path, "t", {"x": 1}, Counter(), is_builder=lambda: False)


def test_a_file_for_other_fields_is_not_trusted(tmp_path):
    """A file renamed to another key's name is caught by the key stored inside it."""
    one = load_or_build(tmp_path, "t", {"x": 1}, Counter())
    two_path = index_cache.cache_path(tmp_path, "t", index_cache.key_hash({"cache_format": 1, "x": 2}))
    shutil.copy(one.path, two_path)
    build = Counter()
    load_or_build(tmp_path, "t", {"x": 2}, build)
    assert build.calls == 1


def test_failed_build_leaves_no_file(tmp_path):
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        load_or_build(tmp_path, "t", {"x": 1}, broken)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def dataset(tmp_path):
    docs = random_documents(np.random.default_rng(0), 50, max_len=30)
    return write_dataset(tmp_path / "data" / "ds", docs), docs


def _gpt(spec, cache_dir, is_builder=True):
    return GPTDataset(spec, open_dataset(spec.path_prefix), cache_dir=str(cache_dir), is_builder=is_builder)


def test_every_field_changes_the_cache_file(dataset, tmp_path):
    prefix, docs = dataset
    cache = tmp_path / "cache"
    base = GPTDatasetSpec(path_prefix=prefix, seq_length=8, seed=1, num_samples=40, doc_range=(0, 40))
    first = _gpt(base, cache)
    assert _gpt(base, cache)._entry.path == first._entry.path  # reused
    changes = [dict(seq_length=9), dict(seed=2), dict(num_samples=41), dict(doc_range=(0, 39)),
               dict(doc_range=(1, 40)), dict(shuffle=False)]
    paths = {first._entry.path}
    for change in changes:
        paths.add(_gpt(replace(base, **change), cache)._entry.path)
    assert len(paths) == len(changes) + 1
    assert _gpt(replace(base, split_name="valid"), cache)._entry.path == first._entry.path
    # Rewriting the dataset (new size and mtime) invalidates its caches too.
    os.utime(prefix + ".idx", ns=(1, 1))
    assert _gpt(base, cache)._entry.path not in paths


def test_content_fingerprint_is_shared_by_copies(dataset, tmp_path):
    prefix, _ = dataset
    copy = str(tmp_path / "copy")
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, copy + suffix)
    spec = GPTDatasetSpec(path_prefix=prefix, seq_length=8, seed=1, num_samples=20, fingerprint="content")
    a = _gpt(spec, tmp_path / "cache")
    b = _gpt(replace(spec, path_prefix=copy), tmp_path / "cache")
    stat_b = _gpt(replace(spec, path_prefix=copy, fingerprint="stat"), tmp_path / "cache")
    assert a._entry.path == b._entry.path != stat_b._entry.path


def _rank_main(rank, prefix, cache_dir, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    spec = GPTDatasetSpec(path_prefix=prefix, seq_length=8, seed=4, num_samples=30)
    if rank == 0:  # the documented pattern: rank 0 builds, everyone waits, the others load
        _gpt(spec, cache_dir)
    dist.barrier()
    ds = _gpt(spec, cache_dir, is_builder=rank == 0)
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.stack([ds.context(i) for i in range(len(ds))]))
    dist.barrier()
    dist.destroy_process_group()


def test_rank0_builds_others_load(dataset, tmp_path, monkeypatch):
    prefix, _ = dataset
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    cache = tmp_path / "cache"
    # fork: the ranks inherit the imports instead of paying for them again
    torch.multiprocessing.start_processes(
        _rank_main, args=(prefix, str(cache), str(tmp_path / "init"), str(tmp_path)), nprocs=2,
        start_method="fork")
    a, b = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(a, b)
    assert len(list(cache.iterdir())) == 1
