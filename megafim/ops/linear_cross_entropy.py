"""Fused linear cross-entropy: ``CE(hidden @ W_shard.T, labels)`` without materialising the logits.

Layout (after Liger-Kernel): Triton kernels -> host functions (validate, choose the chunk, run the
three cuBLAS GEMMs around the kernels) -> ``LinearCrossEntropyFunction`` -> ``linear_cross_entropy``.
The pure-torch version of the per-chunk math is in ``linear_cross_entropy_reference.py``; it is the
CPU path and the reference the kernels are tested against.

Per chunk of C tokens (``docs/kernels.md`` has the full algorithm and the memory arithmetic):
  1. ``logits = h_c @ W_shard.T``                 (C, V_local), input dtype, cuBLAS
  2. Triton: fp32 row max / sum-exp / target logit; across tensor-parallel ranks the max is
     all-reduced (MAX) and the rescaled sums and target logits (SUM); then ``w * (softmax - onehot)``
     is written over ``logits`` in place (no second (C, V_local) buffer).
  3. ``grad_h[c] = grad_logits @ W_shard``        (C, d), cuBLAS
  4. ``grad_W += grad_logits.T @ h_c``            (V_local, d), cuBLAS
The gradients are produced in the forward pass; the backward only scales them by ``grad_output``.
With tensor parallelism ``hidden`` is the replicated activation (do not wrap it in a copy-to-tp op):
its gradient is all-reduced over the group here, once, after the last chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from megafim.ops.linear_cross_entropy_reference import (
    IGNORE_INDEX,
    combine_vocab_shards,
    softmax_grad_chunk_torch,
    token_weights,
    tp_world_size,
)

IMPLS = ("auto", "triton", "torch")

# ---------------------------------------------------------------------------------------------------
# Triton kernels: one program per row of the logits chunk, fp32 math in registers.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _row_stats(row_ptr, n_cols, BLOCK_V: tl.constexpr):
    """Online max and sum of exp(x - max) over one row (fp32)."""
    row_max = float("-inf")
    row_sumexp = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        row_sumexp = row_sumexp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
    return row_max, row_sumexp


@triton.jit
def _target_column(labels_ptr, row, vocab_start, n_cols):
    """This row's target column in the shard, or -1 when another shard (or ignore_index) holds it."""
    local = tl.load(labels_ptr + row) - vocab_start
    in_shard = (local >= 0) & (local < n_cols)
    return tl.where(in_shard, local, -1), in_shard


@triton.jit
def _write_grad_row(row_ptr, n_cols, column, lse, weight, BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with weight * (softmax - onehot(column)), cast to the row's dtype."""
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse)
        grad = tl.where(cols == column, grad - 1.0, grad) * weight
        tl.store(row_ptr + cols, grad.to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lce_fused_kernel(
    logits_ptr, stride_row, labels_ptr, weights_ptr, loss_ptr, n_cols, vocab_start,
    BLOCK_V: tl.constexpr,
):
    """Whole-vocabulary case (tp = 1): loss and gradient of one row in one program.

    logits_ptr: (C, V) chunk in the input dtype, overwritten by its gradient; stride_row: its row
    stride. labels_ptr: (C,) int64. weights_ptr: (C,) fp32 token weights. loss_ptr: (C,) fp32 out,
    ``w * (lse - target_logit)``. BLOCK_V: columns per loop step (power of two).
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    column, in_shard = _target_column(labels_ptr, row, vocab_start, n_cols)
    # Read the target logit before the row is overwritten by its gradient.
    target = tl.load(row_ptr + tl.where(in_shard, column, 0)).to(tl.float32)
    target = tl.where(in_shard, target, 0.0)
    row_max, row_sumexp = _row_stats(row_ptr, n_cols, BLOCK_V)
    lse = row_max + tl.log(row_sumexp)
    weight = tl.load(weights_ptr + row)
    tl.store(loss_ptr + row, weight * (lse - target))
    _write_grad_row(row_ptr, n_cols, column, lse, weight, BLOCK_V)


@triton.jit
def _lce_stats_kernel(
    logits_ptr, stride_row, labels_ptr, max_ptr, sumexp_ptr, target_ptr, n_cols, vocab_start,
    BLOCK_V: tl.constexpr,
):
    """Vocabulary-shard case, pass 1: this shard's row max, sum-exp (relative to it), target logit.

    max_ptr, sumexp_ptr, target_ptr: (C,) fp32 outputs; target is 0 where another shard holds it.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    column, in_shard = _target_column(labels_ptr, row, vocab_start, n_cols)
    target = tl.load(row_ptr + tl.where(in_shard, column, 0)).to(tl.float32)
    row_max, row_sumexp = _row_stats(row_ptr, n_cols, BLOCK_V)
    tl.store(max_ptr + row, row_max)
    tl.store(sumexp_ptr + row, row_sumexp)
    tl.store(target_ptr + row, tl.where(in_shard, target, 0.0))


@triton.jit
def _lce_grad_kernel(
    logits_ptr, stride_row, labels_ptr, weights_ptr, lse_ptr, n_cols, vocab_start,
    BLOCK_V: tl.constexpr,
):
    """Vocabulary-shard case, pass 2: overwrite the row with its gradient, given the global lse (C,)."""
    row = tl.program_id(0).to(tl.int64)
    column, in_shard = _target_column(labels_ptr, row, vocab_start, n_cols)
    lse = tl.load(lse_ptr + row)
    weight = tl.load(weights_ptr + row)
    _write_grad_row(logits_ptr + row * stride_row, n_cols, column, lse, weight, BLOCK_V)


# ---------------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------------

# The logits chunk is the one buffer whose size we choose. Everything else the loss allocates is fixed:
# grad_hidden N*d*e, grad_W V_local*d*e, and ~12 bytes per token of fp32 row statistics (e = bytes per
# element of the input dtype). The chunk costs C*V_local*e bytes: the kernel upcasts to fp32 in
# registers and writes the gradient over the logits, so there is no fp32 copy and no second buffer.
# Budget 256 MiB: e.g. bf16, V = 128256 -> 256 MiB / (128256 * 2 B) = 1046 rows -> C = 1024 (250 MiB);
# V = 32000 -> C = 4096 (250 MiB). Each GEMM is then 2*C*V*d ~ 0.5 TFLOP at d = 2048 (~1 ms on an H100),
# large enough for cuBLAS to run near peak and for launch overheads to vanish, while the chunk stays
# half the size of bf16 grad_W at V = 128256 (501 MiB) and does not grow with the number of tokens.
CHUNK_BUDGET_BYTES = 256 * 2**20
_MAX_BLOCK_V = 4096


def default_chunk_size(n_rows: int, v_local: int, elem_size: int) -> int:
    """Rows per chunk: the largest power of two whose logits fit ``CHUNK_BUDGET_BYTES`` (at least 16)."""
    rows = max(16, CHUNK_BUDGET_BYTES // max(1, v_local * elem_size))
    return min(1 << (rows.bit_length() - 1), max(1, n_rows))


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported; "
            "use impl='torch' (or 'auto') on the CPU"
        )
    return impl


def _softmax_grad_chunk_triton(
    logits: Tensor, labels: Tensor, weights: Tensor, loss_out: Tensor, vocab_start: int,
    group: dist.ProcessGroup | None,
) -> None:
    """The Triton counterpart of ``softmax_grad_chunk_torch``: gradient in place, losses into loss_out."""
    n_rows, n_cols = logits.shape
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(n_cols))
    grid = (n_rows,)
    if tp_world_size(group) == 1:
        _lce_fused_kernel[grid](
            logits, logits.stride(0), labels, weights, loss_out, n_cols, vocab_start,
            BLOCK_V=block_v, num_warps=8,
        )
        return
    row_max, row_sumexp, target = (torch.empty(n_rows, device=logits.device, dtype=torch.float32)
                                   for _ in range(3))
    _lce_stats_kernel[grid](
        logits, logits.stride(0), labels, row_max, row_sumexp, target, n_cols, vocab_start,
        BLOCK_V=block_v, num_warps=8,
    )
    lse, target = combine_vocab_shards(row_max, row_sumexp, target, group)
    _lce_grad_kernel[grid](
        logits, logits.stride(0), labels, weights, lse, n_cols, vocab_start,
        BLOCK_V=block_v, num_warps=8,
    )
    torch.mul(weights, lse - target, out=loss_out)


@dataclass
class LCEResult:
    """What one fused pass returns. ``loss = sum_i w_i * CE_i`` (0-dim fp32, identical on all tp ranks);
    ``grad_hidden`` (N, d) in the input dtype, summed over the vocabulary shards; ``grad_weight``
    (V_local, d), the accumulator passed in when there was one."""

    loss: Tensor
    grad_hidden: Tensor | None
    grad_weight: Tensor | None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype an autocast region on ``device`` computes matrix products in, or None outside one."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _validate(hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor, vocab_start: int,
              same_dtype: bool = True) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden must be (N, d) and weight (V_local, d); "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if (same_dtype and hidden.dtype != weight.dtype) or hidden.device != weight.device:
        raise ValueError(
            f"linear_cross_entropy: hidden ({hidden.dtype}, {hidden.device}) and weight "
            f"({weight.dtype}, {weight.device}) must share dtype and device"
        )
    n = hidden.shape[0]
    if labels.shape != (n,) or weights.shape != (n,):
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} and token weights "
            f"{tuple(weights.shape)} must both be ({n},)"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int32/int64, got {labels.dtype}")
    if vocab_start < 0:
        raise ValueError(f"linear_cross_entropy: vocab_start must be >= 0, got {vocab_start}")


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    weights: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    impl: str = "auto",
    chunk_size: int | None = None,
    need_grad_hidden: bool = True,
    need_grad_weight: bool = True,
    grad_weight_acc: Tensor | None = None,
) -> LCEResult:
    """Loss ``sum_i weights[i] * CE(hidden[i] @ weight.T, labels[i])`` and its gradients, chunked.

    hidden (N, d), weight (V_local, d): this rank's vocabulary rows ``[vocab_start, vocab_start +
    V_local)``. labels (N,) global ids (any id outside the shard, such as ignore_index, has no target
    here). weights (N,) fp32: 0 for ignored tokens, including any normalisation. ``grad_weight_acc``
    (V_local, d), if given, is added to in place (several heads sharing one unembedding). No autograd:
    inputs are used as plain tensors.

    Inside an autocast region the products run in its dtype (bf16 logits from fp32 weights, as an
    autocast ``nn.Linear`` would give), and the gradients come back in the inputs' own dtypes.
    """
    compute_dtype = _autocast_dtype(hidden.device)
    _validate(hidden, weight, labels, weights, vocab_start, same_dtype=compute_dtype is None)
    impl = _resolve_impl(impl, hidden.device)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden, weight = hidden.detach().contiguous(), weight.detach().contiguous()
    labels = labels.contiguous().to(torch.int64)
    weights = weights.detach().to(torch.float32).contiguous()

    loss_rows = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = grad_weight_acc
    if grad_weight is None and need_grad_weight:
        grad_weight = torch.zeros_like(weight)
    if compute_dtype is not None:
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are settled above
        _chunked_loss_and_grads(hidden, weight, labels, weights, loss_rows, grad_hidden, grad_weight,
                                vocab_start, tp_group, impl, chunk_size)
    if grad_hidden is not None and tp_world_size(tp_group) > 1:
        dist.all_reduce(grad_hidden, group=tp_group)
    return LCEResult(loss_rows.sum(), grad_hidden, grad_weight)


def _chunked_loss_and_grads(hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor,
                            loss_rows: Tensor, grad_hidden: Tensor | None, grad_weight: Tensor | None,
                            vocab_start: int, tp_group: dist.ProcessGroup | None, impl: str,
                            chunk_size: int | None) -> None:
    """The chunk loop of ``fused_linear_cross_entropy``: fills loss_rows and the gradients in place.
    A gradient whose dtype differs from the products' (fp32 under autocast) gets each chunk cast."""
    n_rows, v_local = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_size(n_rows, v_local, hidden.element_size())
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h_chunk = hidden[start:end]
        logits = torch.mm(h_chunk, weight.t())  # (C, V_local), becomes its own gradient below
        if impl == "triton":
            _softmax_grad_chunk_triton(logits, labels[start:end], weights[start:end],
                                       loss_rows[start:end], vocab_start, tp_group)
        else:
            loss_rows[start:end] = softmax_grad_chunk_torch(logits, labels[start:end],
                                                            weights[start:end], vocab_start, tp_group)
        if grad_hidden is not None:
            if grad_hidden.dtype == logits.dtype:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = torch.mm(logits, weight)
        if grad_weight is not None:
            if grad_weight.dtype == logits.dtype:
                grad_weight.addmm_(logits.t(), h_chunk)
            else:
                grad_weight.add_(torch.mm(logits.t(), h_chunk))
        del logits


# ---------------------------------------------------------------------------------------------------
# Autograd function and public entry point
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    tp_group: dist.ProcessGroup | None
    vocab_start: int
    impl: str
    chunk_size: int | None


class LinearCrossEntropyFunction(torch.autograd.Function):
    """forward: the fused loss, computing both gradients; backward: the stored gradients * grad_output."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor, options: _Options):
        result = fused_linear_cross_entropy(
            hidden, weight, labels, weights, tp_group=options.tp_group, vocab_start=options.vocab_start,
            impl=options.impl, chunk_size=options.chunk_size,
            need_grad_hidden=ctx.needs_input_grad[0], need_grad_weight=ctx.needs_input_grad[1],
        )
        ctx.grads = (result.grad_hidden, result.grad_weight)
        return result.loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice; its gradients were already used")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # hand the buffers to autograd, which can then keep them without a copy
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, differentiable in hidden and weight.

    hidden (..., d); weight (V_local, d), the vocabulary rows starting at ``vocab_start`` (the whole
    vocabulary when ``tp_group`` is None); labels (...) and loss_mask (...) float weights, same shape.
    ``reduction="mean"``: the masked mean over tokens with a label != ignore_index; ``"sum"``: the
    masked sum. ``impl``: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: labels shape {tuple(labels.shape)} must be hidden's "
            f"{tuple(hidden.shape)} without its last dimension"
        )
    weights = token_weights(labels, loss_mask, ignore_index=ignore_index, reduction=reduction)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return fused_linear_cross_entropy(  # evaluation: the loss alone, no gradient work
            hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), weights, tp_group=tp_group,
            vocab_start=vocab_start, impl=impl, chunk_size=chunk_size,
            need_grad_hidden=False, need_grad_weight=False,
        ).loss
    options = _Options(tp_group, vocab_start, impl, chunk_size)
    return LinearCrossEntropyFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), weights, options
    )
