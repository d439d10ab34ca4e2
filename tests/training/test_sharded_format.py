"""The sharded layout-free format: slices written by several ranks, read back as global tensors one at
a time, compared with the tensors they were cut from."""

import pytest
import torch

from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.sharded import ShardedState, merge_index, write_shard


def test_slices_of_two_ranks_read_back_as_the_global_tensors(tmp_path):
    torch.manual_seed(0)
    full = {"w": torch.randn(6, 4), "v": torch.randn(3, 8), "norm": torch.randn(4)}
    for rank in range(2):  # w split along dim 0, v along dim 1, norm replicated (rank 0 writes it)
        state = {"w": full["w"][3 * rank:3 * rank + 3], "v": full["v"][:, 4 * rank:4 * rank + 4].contiguous()}
        placement = {"w": ((3 * rank, 0), (6, 4)), "v": ((0, 4 * rank), (3, 8))}
        if rank == 0:
            state["norm"] = full["norm"]
        write_shard(tmp_path, f"tp{rank:02d}_pp00", state, placement)
    merge_index(tmp_path, {"step": 3})
    assert not list(tmp_path.glob("tp*.json"))  # the fragments are merged away
    read = ShardedState(tmp_path)
    assert sorted(read) == ["norm", "v", "w"] and read.metadata == {"step": 3}
    for name, tensor in full.items():
        assert read.spec(name) == (tuple(tensor.shape), torch.float32)
        assert torch.equal(read[name], tensor), name


def test_a_slice_missing_from_the_index_is_an_error(tmp_path):
    write_shard(tmp_path, "tp00_pp00", {"w": torch.ones(2, 4)}, {"w": ((0, 0), (4, 4))})
    merge_index(tmp_path)
    with pytest.raises(CheckpointError, match="cover 8 of 16 elements"):
        ShardedState(tmp_path)["w"]
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(CheckpointError, match="index.json: not a valid shard index"):
        ShardedState(tmp_path)


def test_a_region_is_read_from_the_overlapping_slices_only(tmp_path):
    """A rank of another layout reads its region of each global tensor; compared with slicing the whole."""
    torch.manual_seed(0)
    full = {"w": torch.randn(6, 4), "b": torch.randn(6)}
    for rank in range(3):  # three slices of 2 rows each
        rows = slice(2 * rank, 2 * rank + 2)
        write_shard(tmp_path, f"tp{rank:02d}_pp00", {k: v[rows].contiguous() for k, v in full.items()},
                    {"w": ((2 * rank, 0), (6, 4)), "b": ((2 * rank,), (6,))})
    merge_index(tmp_path)
    read = ShardedState(tmp_path)
    for offset, shape in [((0, 0), (3, 4)), ((3, 0), (3, 4)), ((1, 1), (4, 2)), ((5, 3), (1, 1))]:
        region = full["w"][offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1]]
        assert torch.equal(read.read_slice("w", offset, shape), region), (offset, shape)
    assert torch.equal(read.read_slice("b", (2,), (3,)), full["b"][2:5])
    with pytest.raises(CheckpointError, match="cover 3 of 4 elements"):
        read.read_slice("b", (3,), (4,))  # runs past the end of the tensor
