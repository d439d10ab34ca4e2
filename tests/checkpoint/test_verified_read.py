"""megafim.checkpoint.verified_read: a checksum computed while the tensors are read equals the manifest's
(``manifest.checksum_file``, a plain pass over the file; XXH3 and the older manifests' CRC-32) in any
read order, and every corruption, in a read
tensor, a skipped one or the header, a truncation, a missing or unlisted file, is an error naming it."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

from megafim.checkpoint import manifest
from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.verified_read import VerifyingReader, readers_for

NAMES = ("a", "b", "c", "d")


@pytest.fixture
def shard(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(1000).to(torch.bfloat16), "c": torch.arange(7),
               "d": torch.randn(2, 2, 4)}
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "tp00_pp00.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def reader(path, hasher=None, algorithm=manifest.ALGORITHM):
    expected = manifest.checksum_file(path, algorithm)
    return VerifyingReader(path, path.stat().st_size, expected, hasher, algorithm)


@pytest.mark.parametrize("algorithm", sorted(manifest.HASHES))
@pytest.mark.parametrize("in_thread", [False, True])
@pytest.mark.parametrize("order", [NAMES, ("d", "c", "b", "a"), ("b", "d"), ("a", "a", "c"), ()])
def test_reads_the_tensors_and_matches_a_plain_pass_in_any_order(shard, order, in_thread, algorithm):
    path, tensors = shard
    with ThreadPoolExecutor(1) as hasher:
        r = reader(path, hasher if in_thread else None, algorithm)
        for name in order:
            got = r.get_tensor(name)
            assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name])
        r.finish()  # the running hash over all bytes equals manifest.checksum_file's


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("algorithm", sorted(manifest.HASHES))
@pytest.mark.parametrize("where", ["read tensor", "skipped tensor", "header", "last byte"])
def test_a_flipped_bit_anywhere_is_found(shard, where, algorithm):
    path, _ = shard
    expected = manifest.checksum_file(path, algorithm)
    size = path.stat().st_size
    r0 = reader(path)
    begin = r0._data_start
    offsets = {name: begin + r0.header[name]["data_offsets"][0] for name in NAMES}
    r0.close()
    _flip(path, {"read tensor": offsets["a"], "skipped tensor": offsets["c"], "header": 20,
                 "last byte": size - 1}[where])
    with ThreadPoolExecutor(1) as hasher, \
            pytest.raises(CheckpointError, match=r"tp00_pp00.safetensors: (checksum|header)"):
        r = VerifyingReader(path, size, expected, hasher, algorithm)
        r.get_tensor("a")
        r.get_tensor("d")
        r.finish()


def test_truncated_missing_and_unlisted_files_are_named(shard, tmp_path):
    path, _ = shard
    files = {"model/tp00_pp00.safetensors": {"size": path.stat().st_size,
                                             manifest.ALGORITHM: manifest.checksum_file(path)}}
    assert set(readers_for(tmp_path / "model", tmp_path, files)) == {"tp00_pp00.safetensors"}
    with pytest.raises(CheckpointError, match=r"tp00_pp00.safetensors: \d+ bytes, the manifest says"):
        VerifyingReader(path, path.stat().st_size + 8, "00000000")
    (tmp_path / "model" / "tp01_pp00.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"tp01_pp00.safetensors: not listed in"):
        readers_for(tmp_path / "model", tmp_path, files)
    (tmp_path / "model" / "tp01_pp00.safetensors").unlink()
    files["model/tp00_pp01.safetensors"] = dict(files["model/tp00_pp00.safetensors"])
    with pytest.raises(CheckpointError, match=r"tp00_pp01.safetensors: missing \(listed in"):
        readers_for(tmp_path / "model", tmp_path, files)


def test_an_unchecked_reader_reads_the_same_tensors_into_their_place(shard):
    path, tensors = shard
    r = VerifyingReader(path)
    dest = torch.empty(2, 3, 5)
    got = r.get_tensor("a", into=dest[1])  # contiguous and of its shape: read in place
    assert got.data_ptr() == dest[1].data_ptr() and torch.equal(dest[1], tensors["a"])
    assert torch.equal(r.get_tensor("b", into=torch.empty(3)), tensors["b"])  # does not fit: a new tensor
    _flip(path, path.stat().st_size - 1)
    r.finish()  # nothing to compare
