"""Rank layout, size checks and invalid tensor-parallel sizes: all without any process group."""

import pytest
import torch

from megafim.model import GPT, model_config
from megafim.parallel import ParallelDims, ParallelSizeError, apply_tensor_parallel
from megafim.parallel.dims import coordinates, global_rank, group_layout
from megafim.parallel.mappings import copy_to_tensor_parallel, gather_from_sequence_parallel


def test_rank_order_is_tp_then_dp_then_pp():
    layout = group_layout(tp=2, dp=3, pp=2)
    assert layout["tp"][:2] == [[0, 1], [2, 3]]
    assert layout["dp"][0] == [0, 2, 4]
    assert layout["pp"][0] == [0, 6]
    assert layout["model"][0] == [0, 1, 6, 7]
    for kind, groups in layout.items():  # every kind partitions the world
        assert sorted(r for g in groups for r in g) == list(range(12)), kind
    for rank in range(12):
        assert global_rank(*coordinates(rank, 2, 3, 2), 2, 3) == rank


def test_parallel_dims_coordinates_without_groups():
    dims = ParallelDims(tp=2, pp=2, dp=3, rank=7)
    assert (dims.tp_rank, dims.dp_rank, dims.pp_rank) == (1, 0, 1)
    assert dims.ranks("tp") == [6, 7] and dims.ranks("pp") == [1, 7] and dims.world_size == 12


@pytest.mark.parametrize("tp, pp, dp, message", [
    (3, 1, None, "not divisible by tensor \\(3\\)"),
    (2, 1, 3, "= 6 ranks, but the world size is 4"),
    (0, 1, None, "parallel.tensor must be a positive integer"),
    (1, -2, None, "parallel.pipeline"),
])
def test_build_checks_sizes_before_any_group_work(monkeypatch, tp, pp, dp, message):
    # torch.distributed is not initialised here: reaching group creation would raise RuntimeError
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not torch.distributed.is_initialized()
    with pytest.raises(ParallelSizeError, match=message):
        ParallelDims.build(tp=tp, pp=pp, dp=dp)


def test_build_without_process_group_says_so(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelDims.build()


@pytest.mark.parametrize("overrides, tp, field", [
    (dict(n_heads=8, n_kv_heads=4), 3, "n_heads = 8"),
    (dict(n_heads=8, n_kv_heads=4), 8, "n_kv_heads = 4"),
    (dict(ffn_hidden_size=170), 4, "ffn_hidden_size = 170"),
    (dict(vocab_size=510), 4, "vocab_size = 510"),
])
def test_invalid_tensor_parallel_sizes_fail_before_any_work(overrides, tp, field):
    model = GPT(model_config("tiny", **overrides))
    before = {n: p.clone() for n, p in model.named_parameters()}
    dims = ParallelDims(tp=tp, pp=1, dp=1, rank=0)  # no groups: touching one would crash differently
    with pytest.raises(ParallelSizeError, match=f"ModelConfig.{field}"):
        apply_tensor_parallel(model, dims)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing was sharded
    assert type(model.layers["0"].self_attn.q_proj) is torch.nn.Linear


def test_tp1_leaves_the_model_alone():
    model = GPT(model_config("tiny"))
    dims = ParallelDims(tp=1, pp=1, dp=1, rank=0)
    assert apply_tensor_parallel(model, dims, sequence_parallel=True) is model
    assert type(model.embed_tokens) is torch.nn.Embedding


def test_mappings_are_identities_without_a_group():
    x = torch.randn(2, 4, 8, requires_grad=True)
    y = gather_from_sequence_parallel(copy_to_tensor_parallel(x, None), None)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
