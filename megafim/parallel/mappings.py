"""Collectives with autograd for tensor and sequence parallelism (after Megatron-core's mappings.py).

Three layers:
  1. private collectives that return their input untouched on a one-rank (or None) group;
  2. one ``torch.autograd.Function`` per conjugate pair, whose ``gather_first``/``reduce_first`` flag
     says which of the two runs forward (the other runs backward);
  3. public wrappers whose docstrings say "forward: X, backward: Y".

Activations are batch-first (B, T, d): the sequence dim is 1, the tensor-parallel split is the last.
A group of None means "no parallelism" here, never torch's default group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

SEQ_DIM = 1

# torch 2.13 renamed the single-tensor collectives; setup.py allows torch >= 2.3, which has only
# the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# -- 1. collectives -------------------------------------------------------------------------------------


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _check_divisible(x: Tensor, dim: int, size: int, what: str) -> None:
    if x.shape[dim] % size:
        raise ValueError(f"{what}: dim {dim} of a {tuple(x.shape)} tensor is not divisible by the "
                         f"{size} tensor-parallel ranks (under sequence parallelism the sequence length "
                         "must be a multiple of the tensor-parallel size)")


def _all_reduce(x: Tensor, group) -> Tensor:
    if group_size(group) == 1:
        return x
    # A copy, not in place: the input may be a gradient autograd also hands to another branch
    # (x + f(x) gives both the same tensor), or an activation saved for backward.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split(x: Tensor, group, dim: int) -> Tensor:
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x, dim, size, "split")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: Tensor, group, dim: int) -> Tensor:
    size = group_size(group)
    if size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()  # the collective concatenates along dim 0
    out = front.new_empty((size * front.shape[0], *front.shape[1:]))
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: Tensor, group, dim: int) -> Tensor:
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x, dim, size, "reduce-scatter")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // size, *front.shape[1:]))
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


# -- 2. conjugate pairs --------------------------------------------------------------------------------


class _CopyReduce(torch.autograd.Function):
    """copy: forward identity, backward all-reduce. reduce (reduce_first): the opposite."""

    @staticmethod
    def forward(ctx, x: Tensor, group, reduce_first: bool) -> Tensor:
        ctx.group, ctx.reduce_first = group, reduce_first
        return _all_reduce(x, group) if reduce_first else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad if ctx.reduce_first else _all_reduce(grad, ctx.group)), None, None


class _SplitGather(torch.autograd.Function):
    """scatter: forward split along dim, backward all-gather. gather (gather_first): the opposite."""

    @staticmethod
    def forward(ctx, x: Tensor, group, dim: int, gather_first: bool) -> Tensor:
        ctx.group, ctx.dim, ctx.gather_first = group, dim, gather_first
        return _all_gather(x, group, dim) if gather_first else _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = _split(grad, ctx.group, ctx.dim) if ctx.gather_first else _all_gather(grad, ctx.group, ctx.dim)
        return out, None, None, None


class _ReduceScatterGather(torch.autograd.Function):
    """reduce-scatter forward with all-gather backward; or (gather_first) all-gather forward with
    reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group, dim: int, gather_first: bool) -> Tensor:
        ctx.group, ctx.dim, ctx.gather_first = group, dim, gather_first
        return _all_gather(x, group, dim) if gather_first else _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.gather_first:
            return _reduce_scatter(grad, ctx.group, ctx.dim), None, None, None
        return _all_gather(grad, ctx.group, ctx.dim), None, None, None


# -- 3. public wrappers --------------------------------------------------------------------------------


def copy_to_tensor_parallel(x: Tensor, group) -> Tensor:
    """forward: identity, backward: all-reduce. The input of a column-parallel matmul: every rank's
    shard of the output contributes a partial gradient of the replicated input."""
    return _CopyReduce.apply(x, group, False)


def reduce_from_tensor_parallel(x: Tensor, group) -> Tensor:
    """forward: all-reduce, backward: identity. The output of a row-parallel matmul (partial sums)."""
    return _CopyReduce.apply(x, group, True)


def scatter_to_tensor_parallel(x: Tensor, group) -> Tensor:
    """forward: keep this rank's chunk of the last dim, backward: all-gather along the last dim."""
    return _SplitGather.apply(x, group, -1, False)


def gather_from_tensor_parallel(x: Tensor, group) -> Tensor:
    """forward: all-gather along the last dim, backward: keep this rank's chunk of the last dim."""
    return _SplitGather.apply(x, group, -1, True)


def scatter_to_sequence_parallel(x: Tensor, group) -> Tensor:
    """forward: keep this rank's chunk of the sequence (dim 1), backward: all-gather along it.
    For a replicated activation entering a sequence-parallel region."""
    return _SplitGather.apply(x, group, SEQ_DIM, False)


def gather_from_sequence_parallel(x: Tensor, group) -> Tensor:
    """forward: all-gather along the sequence, backward: keep this rank's chunk. For a consumer that
    is replicated on every rank and hands back the same (full) gradient everywhere."""
    return _SplitGather.apply(x, group, SEQ_DIM, True)


def reduce_scatter_to_sequence_parallel(x: Tensor, group) -> Tensor:
    """forward: reduce-scatter along the sequence, backward: all-gather along it. The output of a
    row-parallel matmul (or the vocab-parallel embedding) under sequence parallelism."""
    return _ReduceScatterGather.apply(x, group, SEQ_DIM, False)


def all_gather_sequence_for_tensor_parallel(x: Tensor, group) -> Tensor:
    """forward: all-gather along the sequence, backward: reduce-scatter along it. The input of a
    column-parallel matmul under sequence parallelism: each rank's output shard gives a partial
    gradient of the whole gathered input."""
    return _ReduceScatterGather.apply(x, group, SEQ_DIM, True)


def all_gather_context_parallel(x: Tensor, group) -> Tensor:
    """forward: all-gather along the sequence over the context-parallel ranks (rank order), backward:
    reduce-scatter along it. Keys and values: every rank's queries attend to every rank's keys, so a
    rank's keys get the sum of all ranks' gradients for them."""
    return _ReduceScatterGather.apply(x, group, SEQ_DIM, True)
