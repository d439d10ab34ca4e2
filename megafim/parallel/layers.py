"""Tensor-parallel layers built FROM a full (tp = 1) module: each keeps this rank's shard.

So a model is built (and initialised) once, identically on every rank, and parallelised from
outside. Sharded parameters carry Megatron's attributes ``tensor_model_parallel = True`` and
``partition_dim``, which DeepSpeed reads (gradient-norm de-duplication) and which say how to gather a
full tensor back (checkpoints, tests).
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megafim.model.layers import RMSNorm, rms_norm
from megafim.parallel.mappings import (
    all_gather_sequence_for_tensor_parallel,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    group_rank,
    group_size,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
    scatter_to_sequence_parallel,
)


def shard_parameter(full: Tensor, dim: int, group: dist.ProcessGroup | None) -> nn.Parameter:
    """This rank's contiguous 1/tp of ``full`` along ``dim``, as a new Parameter (the full one can go)."""
    size = group_size(group)
    if full.shape[dim] % size:
        raise ValueError(f"shard_parameter: dim {dim} of {tuple(full.shape)} is not divisible by tp = {size}")
    piece = full.detach().chunk(size, dim=dim)[group_rank(group)].clone()
    param = nn.Parameter(piece, requires_grad=full.requires_grad)
    param.tensor_model_parallel = True
    param.partition_dim = dim
    return param


class ColumnParallelLinear(nn.Module):
    """y_shard = x @ W_shard.T: output features split over the ranks (W's rows), input replicated.

    Under sequence parallelism the input is this rank's (B, T/tp, d) and is all-gathered first."""

    def __init__(self, full: nn.Linear, group: dist.ProcessGroup | None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.process_group, self.sequence_parallel = group, sequence_parallel
        self.weight = shard_parameter(full.weight, 0, group)  # (out / tp, in)
        self.bias = None if full.bias is None else shard_parameter(full.bias, 0, group)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, in) -> (B, T, out / tp)
        if self.sequence_parallel:
            x = all_gather_sequence_for_tensor_parallel(x, self.process_group)
        else:
            x = copy_to_tensor_parallel(x, self.process_group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_ranks x_shard @ W_shard.T: input features split (W's columns), partial sums reduced.

    Under sequence parallelism the sum is reduce-scattered, leaving (B, T/tp, out) on each rank."""

    def __init__(self, full: nn.Linear, group: dist.ProcessGroup | None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.process_group, self.sequence_parallel = group, sequence_parallel
        self.weight = shard_parameter(full.weight, 1, group)  # (out, in / tp)
        # the bias is replicated and added once, after the reduction
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:  # (B, T, in / tp) -> (B, T, out)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel(y, self.process_group)
        else:
            y = reduce_from_tensor_parallel(y, self.process_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + V/tp) of the embedding; other ids look up zeros, then the
    ranks' results are summed (reduce-scattered along the sequence under sequence parallelism)."""

    def __init__(self, full: nn.Embedding, group: dist.ProcessGroup | None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.process_group, self.sequence_parallel = group, sequence_parallel
        self.weight = shard_parameter(full.weight, 0, group)  # (V / tp, d)
        self.vocab_start = group_rank(group) * self.weight.shape[0]

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, d), or (B, T/tp, d)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(out, self.process_group)
        return reduce_from_tensor_parallel(out, self.process_group)


class VocabParallelUnembedding(nn.Module):
    """This rank's vocabulary rows of the unembedding.

    The training loss reads ``weight``, ``process_group`` and ``vocab_start`` and computes a
    vocab-parallel cross-entropy without gathering logits; calling the module (inference) returns the
    full logits, gathered along the vocabulary."""

    def __init__(self, full: nn.Linear, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        if full.bias is not None:
            raise ValueError("VocabParallelUnembedding: the unembedding has no bias in this model")
        self.process_group = group
        self.weight = shard_parameter(full.weight, 0, group)  # (V / tp, d)
        self.vocab_start = group_rank(group) * self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:  # (..., d) replicated -> (..., V)
        logits = F.linear(copy_to_tensor_parallel(x, self.process_group), self.weight)
        return gather_from_tensor_parallel(logits, self.process_group)


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm over this rank's slice of the sequence. Its weight is replicated but each rank sees only
    T/tp tokens, so the weight's gradient is all-reduced (copy_to_tensor_parallel on the weight)."""

    def __init__(self, full: RMSNorm, group: dist.ProcessGroup | None) -> None:
        nn.Module.__init__(self)
        self.eps, self.process_group = full.eps, group
        self.weight = full.weight  # the same Parameter: its name and value stay

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, copy_to_tensor_parallel(self.weight, self.process_group), self.eps)


class SequenceScatter(nn.Module):
    """Module form of ``scatter_to_sequence_parallel`` (fills GPT.sequence_scatter)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.process_group = group

    def forward(self, x: Tensor) -> Tensor:
        return scatter_to_sequence_parallel(x, self.process_group)


class SequenceGather(nn.Module):
    """Module form of ``gather_from_sequence_parallel`` (fills GPT.sequence_gather)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.process_group = group

    def forward(self, x: Tensor) -> Tensor:
        return gather_from_sequence_parallel(x, self.process_group)
