"""Context parallelism: each sample's sequence split over ``cp`` ranks, attention by all-gathered keys
and values (the scheme Llama 3 trained its long contexts with; docs/parallelism.md says why).

The sequence is cut into 2 cp chunks and rank i holds chunks i and 2 cp - 1 - i: under a causal mask
the late chunks attend to much more than the early ones, and this pairing gives every rank the same
amount of attention work. Every layer all-gathers the keys and values of the whole sequence (in rank
order; ``key_positions`` says where each one sits) and masks by position, and by document when the
batch packs documents: the mask is the same function of (query position, key position, documents)
as without context parallelism, which is why document masks need nothing more. The backward of the
gather is a reduce-scatter, so each rank's keys and values get every rank's gradient for them.

Everything that is per position is split here, outside the model: tokens, the layout (positions and
documents) and the heads' targets, which are shifted and normalised on the whole sequence first, so
head k at the end of a chunk is scored on a label that lies in another rank's chunk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megafim.parallel.dims import ParallelDims
from megafim.parallel.mappings import all_gather_context_parallel


def check_context_parallel_sizes(seq_len: int, cp: int) -> None:
    """The sequence must cut into 2 cp equal chunks; the message names the flag."""
    if seq_len % (2 * cp):
        raise ValueError(f"--context-parallel-size {cp}: the sequence length {seq_len} is not divisible by "
                         f"2 x {cp} (each rank holds two chunks)")


def local_positions(seq_len: int, cp: int, cp_rank: int, device: torch.device | None = None) -> Tensor:
    """(seq_len / cp,) positions rank ``cp_rank`` holds: chunk cp_rank, then chunk 2 cp - 1 - cp_rank."""
    check_context_parallel_sizes(seq_len, cp)
    chunk = seq_len // (2 * cp)
    first, second = cp_rank * chunk, (2 * cp - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def gathered_positions(seq_len: int, cp: int, device: torch.device | None = None) -> Tensor:
    """(seq_len,) position of each key after the all-gather: every rank's ``local_positions`` in rank order."""
    return torch.cat([local_positions(seq_len, cp, r, device) for r in range(cp)])


class ContextParallelKVGather(nn.Module):
    """Fills ``Attention.kv_gather``: (B, T/cp, Hkv, hd) -> (B, T, Hkv, hd), all ranks' keys in rank order."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.process_group = group

    def forward(self, x: Tensor) -> Tensor:
        return all_gather_context_parallel(x, self.process_group)


def apply_context_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Make every attention layer of ``model`` (a GPT or a pipeline stage of one) gather its keys and
    values over ``dims.cp_group``. Nothing to do with cp = 1. Weights are untouched."""
    if dims.cp == 1:
        return model
    from megafim.model.attention import Attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.kv_gather = ContextParallelKVGather(dims.cp_group)
    return model


__all__ = ["apply_context_parallel", "check_context_parallel_sizes", "gathered_positions",
           "local_positions", "ContextParallelKVGather"]
