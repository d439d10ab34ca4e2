"""Pure-torch math of the fused linear cross-entropy: the CPU path and the reference for the Triton kernels.

The Triton kernels in ``linear_cross_entropy.py`` and the functions here do the same arithmetic on one
chunk of logits: fp32 statistics per row (max, sum of exponentials, target logit), combined across the
tensor-parallel vocabulary shards, then ``w * (softmax - onehot)`` written over the chunk in place.
Keeping each math step in a small helper (as Megatron-core's vocab-parallel cross-entropy does) lets
both implementations share the shard combination and the token weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

IGNORE_INDEX = -100


def tp_world_size(group: dist.ProcessGroup | None) -> int:
    """Size of the tensor-parallel group; ``None`` means no tensor parallelism (never the default group)."""
    return 1 if group is None else dist.get_world_size(group)


def token_weights(
    labels: Tensor, loss_mask: Tensor | None, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    """Per-token fp32 weights ``w`` such that the loss is ``sum_i w_i * CE_i``.

    Tokens whose label is ``ignore_index`` get weight 0; ``loss_mask`` (float) multiplies the rest. With
    ``reduction="mean"`` the weights are divided by their sum (the masked mean), computed on the device
    without a host sync; an all-masked batch gives weights of 0 (loss 0), not NaN.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    weights = (labels != ignore_index).to(torch.float32)
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != labels shape {tuple(labels.shape)}")
        weights = weights * loss_mask.to(torch.float32)
    if reduction == "mean":
        total = weights.sum()
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    return weights.reshape(-1)


def combine_vocab_shards(
    row_max: Tensor, row_sumexp: Tensor, target_logit: Tensor, group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor]:
    """Log-sum-exp over the whole vocabulary and the target logit, from each shard's statistics.

    ``row_sumexp`` is relative to this shard's ``row_max``; ``target_logit`` is 0 on every rank but the
    one whose shard holds the target. Two all-reduces per chunk: MAX of the maxima, then one SUM of the
    rescaled sums stacked with the target logits. All tensors are (C,) fp32.
    """
    if tp_world_size(group) == 1:
        return row_max + torch.log(row_sumexp), target_logit
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    stacked = torch.stack([row_sumexp * torch.exp(row_max - global_max), target_logit])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return global_max + torch.log(stacked[0]), stacked[1]


def local_targets(labels: Tensor, vocab_start: int, v_local: int) -> tuple[Tensor, Tensor]:
    """Column of each row's target inside this shard (clamped to a valid column) and whether it is here."""
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    return torch.where(in_shard, local, torch.zeros_like(local)), in_shard


def softmax_grad_chunk_torch(
    logits: Tensor, labels: Tensor, weights: Tensor, vocab_start: int, group: dist.ProcessGroup | None
) -> Tensor:
    """Overwrite ``logits`` (C, V_local) with ``w * (softmax - onehot)``; return the (C,) fp32 losses ``w * CE``.

    The kernels' statistics in fp32, written for the CPU: one exponential per element, kept for the
    gradient as ``exp(x - max) * exp(max - lse)``, in place on the fp32 chunk (the chunk itself when
    the input is fp32: it is overwritten by its gradient anyway, after the target logits are read).
    """
    x = logits.to(torch.float32)  # (C, V_local); `logits` itself when already fp32
    column, in_shard = local_targets(labels, vocab_start, x.shape[1])
    target = torch.where(in_shard, x.gather(1, column[:, None]).squeeze(1), torch.zeros_like(weights))
    row_max = x.amax(dim=1)
    x.sub_(row_max[:, None]).exp_()  # exp(x - row_max)
    lse, target = combine_vocab_shards(row_max, x.sum(dim=1), target, group)
    x.mul_((torch.exp(row_max - lse) * weights)[:, None])  # w * softmax
    x.scatter_add_(1, column[:, None], -(weights * in_shard)[:, None])  # - w * onehot
    if x is not logits:
        logits.copy_(x)
    return weights * (lse - target)
