"""Vocabulary-parallel cross-entropy and multi-token loss with tp = 2: spawned gloo workers, each holding a
slice of a full-vocabulary reference (and of the heads' MLPs), must reproduce the tp = 1 loss and
gradients. Uneven shards (odd vocabulary) are part of the test."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megafim.ops.linear_cross_entropy import linear_cross_entropy
from megafim.ops.multi_token_loss import multi_token_loss
from tests.ops.naive import TOLERANCES, TinyHeads, assert_close, naive_loss, naive_multi_token_loss

WORLD = 2


def _shard(vocab: int, rank: int) -> slice:
    bounds = [0, (vocab + 1) // 2, vocab]  # odd vocab: rank 0 holds one row more
    return slice(bounds[rank], bounds[rank + 1])


def _data(dtype, tokens=(2, 9), dim=8, vocab=37):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(*tokens, dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / 2).to(dtype)
    labels = torch.randint(0, vocab, tokens, generator=gen)
    labels[0, 1] = -100
    mask = torch.rand(tokens, generator=gen).round()
    return hidden, weight, labels, mask


def _check_linear_ce(rank, group, impl, dtype):
    hidden, weight, labels, mask = _data(dtype)
    rows = _shard(weight.shape[0], rank)
    h = hidden.clone().requires_grad_(True)
    w = weight[rows].clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, mask, tp_group=group, vocab_start=rows.start, impl=impl,
                                chunk_size=4)
    loss.backward()
    h_ref, w_ref = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = naive_loss(h_ref, w_ref, labels, mask)
    ref.backward()
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss"], f"rank {rank} {impl} loss")
    assert_close(h.grad, h_ref.grad, tol["grad"], f"rank {rank} {impl} grad hidden")
    assert_close(w.grad, w_ref.grad[rows], tol["grad"], f"rank {rank} {impl} grad weight shard")


def _check_multi_token(rank, group, impl, n):
    hidden, weight, labels, mask = _data(torch.float32)
    full = TinyHeads(n, 8, 12, seed=5).double()
    mine = TinyHeads(n, 8, 12, seed=5, tp_group=group, rank=rank, world=WORLD)
    rows = _shard(weight.shape[0], rank)
    h = hidden.clone().requires_grad_(True)
    w = weight[rows].clone().requires_grad_(True)
    loss, _ = multi_token_loss(h, mine.callables(), list(mine.parameters()), w, labels, mask,
                               tp_group=group, vocab_start=rows.start, impl=impl, chunk_size=5)
    loss.backward()
    h_ref, w_ref = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = naive_multi_token_loss(h_ref, full.callables(), w_ref, labels, mask)
    ref.backward()
    tol = TOLERANCES[torch.float32]
    what = f"rank {rank} {impl} n={n}"
    assert_close(loss, ref, tol["loss"], f"{what} loss")
    with torch.no_grad():  # the evaluation path combines the shards the same way
        eval_loss, _ = multi_token_loss(hidden, mine.callables(), list(mine.parameters()), weight[rows], labels,
                                        mask, tp_group=group, vocab_start=rows.start, impl=impl, chunk_size=5)
    assert_close(eval_loss, ref, tol["loss"], f"{what} eval loss")
    assert_close(h.grad, h_ref.grad, tol["grad"], f"{what} grad hidden")
    assert_close(w.grad, w_ref.grad[rows], tol["grad"], f"{what} grad unembedding shard")
    cols = slice(rank * 6, rank * 6 + 6)  # hidden 12 split over 2 ranks
    for k in range(n):
        assert_close(mine.up[k].grad, full.up[k].grad[cols], tol["grad"], f"{what} grad up[{k}]")
        assert_close(mine.down[k].grad, full.down[k].grad[:, cols], tol["grad"], f"{what} grad down[{k}]")
    assert_close(mine.norm.grad, full.norm.grad, tol["grad"], f"{what} grad shared norm")


def _worker(rank: int, store_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        group = dist.new_group(list(range(WORLD)))
        for impl in ("torch", "triton"):
            for dtype in (torch.float32, torch.bfloat16):
                _check_linear_ce(rank, group, impl, dtype)
            for n in (1, 2, 4):
                _check_multi_token(rank, group, impl, n)
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.distributed
def test_tp2_matches_full_vocabulary_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
