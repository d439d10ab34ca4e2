"""Naive references for the fused cross-entropy tests: full logits, F.cross_entropy, one backward.

Also tiny multi-token heads (a residual MLP block and a shared final RMSNorm) that can be built whole
or as one tensor-parallel rank's shard, with the collectives a Megatron-style head contains.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Tolerances of ours against a float64 naive run on the same inputs: max |ours - ref| / max |ref|.
TOLERANCES = {
    torch.float32: {"loss": 2e-6, "grad": 2e-5},
    torch.bfloat16: {"loss": 1e-2, "grad": 3e-2},
}


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """Relative max-norm error: robust to gradients whose scale depends on the shape and the mask."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def naive_loss(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor | None,
               ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Masked cross-entropy of the whole (N, V) logits."""
    logits = (hidden @ weight.t()).reshape(-1, weight.shape[0]).double()
    ce = F.cross_entropy(logits, labels.reshape(-1), reduction="none", ignore_index=ignore_index)
    w = (labels.reshape(-1) != ignore_index).double()
    if mask is not None:
        w = w * mask.reshape(-1).double()
    total = (ce * w).sum()
    return total / w.sum().clamp_min(1e-30) if reduction == "mean" else total


def naive_multi_token_loss(hidden: Tensor, heads, weight: Tensor, labels: Tensor, mask: Tensor,
                           ignore_index: int = -100) -> Tensor:
    """Every head materialised at once: sum over k of the masked mean CE of head k against labels[t+k]."""
    seq = labels.shape[1]
    total = 0
    for k, head in enumerate(heads):
        normed = head(hidden)[:, : seq - k]
        total = total + naive_loss(normed, weight, labels[:, k:], mask[:, k:], ignore_index)
    return total


class _CopyToTP(torch.autograd.Function):
    """forward: identity; backward: all-reduce over the tp group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce over the tp group; backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TinyHeads(nn.Module):
    """n heads ``norm(x + down(silu(up(x))))`` sharing one final RMSNorm.

    With ``tp_group``, ``up`` holds this rank's rows and ``down`` its columns of the full model built
    with the same seed (a column- then row-parallel pair), so the shards reproduce the full heads.
    """

    def __init__(self, n: int, dim: int, hidden: int, seed: int, dtype=torch.float32,
                 tp_group=None, rank: int = 0, world: int = 1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        rows = slice(rank * hidden // world, (rank + 1) * hidden // world)
        self.up = nn.ParameterList(
            nn.Parameter((torch.randn(hidden, dim, generator=gen) / dim**0.5)[rows].to(dtype)) for _ in range(n))
        self.down = nn.ParameterList(
            nn.Parameter((torch.randn(dim, hidden, generator=gen) / hidden**0.5)[:, rows].to(dtype))
            for _ in range(n))
        self.norm = nn.Parameter((1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype))
        self.tp_group = tp_group

    def head(self, k: int, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        inner = _CopyToTP.apply(x, self.tp_group) if self.tp_group is not None else x
        out = F.silu(inner @ self.up[k].t()) @ self.down[k].t()
        if self.tp_group is not None:
            out = _ReduceFromTP.apply(out, self.tp_group)
        return F.rms_norm(x + out, (x.shape[-1],), self.norm, eps=1e-6)

    def callables(self):
        return [lambda x, k=k: self.head(k, x) for k in range(len(self.up))]
