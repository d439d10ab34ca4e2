"""Multi-token prediction loss with sequential head backward (Gloeckle et al. 2024, section 2).

The trunk runs once; then, inside ONE ``torch.autograd.Function``, each head in turn runs its forward
on a detached copy of the trunk output, the fused linear cross-entropy (which yields the gradient of
the head's normed output and of the shared unembedding), and ``torch.autograd.grad`` back to the trunk
output and the head's parameters. The gradients are accumulated and the head's activations and logits
freed before the next head starts, so peak memory holds one head's activations and one logits chunk
whatever the number of heads. The function's backward hands the stored gradients (times grad_output)
to autograd, so the trainer calls backward once: one backward per head gives silently wrong
gradients under ZeRO-1/2 (docs/platform_notes.md).

Parameters that a data-parallel wrapper keeps partitioned outside their module's forward (ZeRO-3) are
gathered through ``PartitionedParams``, an interface the caller supplies (megafim.parallel.part);
this module knows nothing of any particular wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from megafim.ops.linear_cross_entropy import fused_linear_cross_entropy
from megafim.ops.linear_cross_entropy_reference import IGNORE_INDEX, token_weights

Head = Callable[[Tensor], Tensor]


class PartitionedParams(Protocol):
    """The partitioned parameters among the loss's inputs, and their gathering.

    Outside its module's forward a partitioned parameter has shape [0]. Autograd records an input's
    shape when the function is applied and checks gradients against it, and the parameter's gradient
    accumulator copies a gradient into the parameter's current layout: so the parameters must be
    gathered (full shape) both when the function is applied and when their gradients are accumulated
    in backward, as the wrapper's own module hooks arrange for ordinary layers. Around the loss's
    backward node, ``_GatherInBackward`` gathers them before it and ``_ReleaseInBackward`` (on the
    trunk output, downstream of the accumulators, which autograd runs first) partitions them after.
    This holds every head's parameters and W at once during those calls: the price of partitioning here.
    """

    params: Sequence[Tensor]
    """The partitioned ones among the tensors given (empty: nothing to gather)."""

    def gather(self) -> None:
        """Make every partitioned parameter whole."""

    def release(self) -> None:
        """Partition again what ``gather`` made whole (and no module holds now)."""


# Given the loss's parameter tensors, the ``PartitionedParams`` among them.
PartitionedParamsFactory = Callable[[Sequence[Tensor]], PartitionedParams]


class _NothingPartitioned:
    """``PartitionedParams`` for plain tensors."""

    params: Sequence[Tensor] = ()

    def __init__(self, tensors: Sequence[Tensor] = ()):
        pass

    def gather(self) -> None:
        pass

    def release(self) -> None:
        pass


@dataclass(frozen=True)
class _Spec:
    """Everything the autograd function needs besides its tensor inputs."""

    heads: tuple[Head, ...]
    targets: "HeadTargets"
    tp_group: dist.ProcessGroup | None
    vocab_start: int
    impl: str
    chunk_size: int | None


def shifted_targets(labels: Tensor, loss_mask: Tensor, k: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Head k's labels and mask at position t: ``labels[t + k]`` and ``loss_mask[t + k]``.

    The mask travels with the label it weights (both are aligned with ``labels``); the last k positions
    have no target and get ``ignore_index`` / 0. Returns (B, T) tensors.
    """
    seq = labels.shape[1]
    shifted = torch.full_like(labels, ignore_index)
    mask = torch.zeros_like(loss_mask, dtype=torch.float32)
    if k < seq:
        shifted[:, : seq - k] = labels[:, k:]
        mask[:, : seq - k] = loss_mask[:, k:]
    return shifted, mask


@dataclass(frozen=True)
class HeadTargets:
    """Every head's targets at every position, shifted, masked and normalised once per batch: so a
    rank holding only some positions (context parallelism) scores them exactly as the whole would."""

    labels: Tensor
    """(n, B, T): head k's label at position t (``labels[t + k]``; ignore_index where none)."""
    weights: Tensor
    """(n, B, T) fp32: that label's weight in head k's masked mean over the whole batch (a head's
    weights sum to 1, or are all 0)."""

    def select(self, index: Tensor) -> "HeadTargets":
        """The targets at positions ``index`` (T_local,), still weighted for the whole sequence."""
        return HeadTargets(self.labels[:, :, index], self.weights[:, :, index])


def head_targets(labels: Tensor, loss_mask: Tensor | None, n_heads: int, *, segment_ids: Tensor | None = None,
                 label_segment_ids: Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> HeadTargets:
    """Head k's targets: ``labels[t + k]`` weighted by ``loss_mask[t + k]`` (aligned with labels).

    With document segments (B, T) (``segment_ids`` of the inputs, ``label_segment_ids`` of the labels),
    a label that lies in a later document than position t is dropped: under a document mask the model
    cannot know the next document."""
    if loss_mask is None:
        loss_mask = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    out_labels, out_weights = [], []
    for k in range(n_heads):
        labels_k, mask_k = shifted_targets(labels, loss_mask, k, ignore_index)
        if segment_ids is not None:
            seg_k, _ = shifted_targets(label_segment_ids, loss_mask, k, -1)  # -1: no label at all
            mask_k = mask_k * (seg_k == segment_ids)
        out_labels.append(labels_k)
        out_weights.append(token_weights(labels_k, mask_k, ignore_index=ignore_index).view(labels.shape))
    return HeadTargets(torch.stack(out_labels), torch.stack(out_weights))


def _run_head(spec: _Spec, k: int, hidden: Tensor, weight: Tensor, grad_params: list[Tensor],
              grad_weight: Tensor | None) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
    """Forward, loss and backward of head k. Returns (loss_k, d loss_k / d hidden, d loss_k / d params)."""
    batch, seq, dim = hidden.shape
    labels_k, weights_k = spec.targets.labels[k], spec.targets.weights[k].reshape(-1)
    with torch.enable_grad():
        trunk_out = hidden.detach().requires_grad_(True)
        normed = spec.heads[k](trunk_out)  # (B, T, d)
        if normed.shape != hidden.shape:
            raise ValueError(f"multi_token_loss: head {k} returned shape {tuple(normed.shape)}, "
                             f"expected the hidden's {tuple(hidden.shape)}")
        result = fused_linear_cross_entropy(
            normed.detach().reshape(batch * seq, dim), weight, labels_k.reshape(-1), weights_k,
            tp_group=spec.tp_group, vocab_start=spec.vocab_start, impl=spec.impl,
            chunk_size=spec.chunk_size, need_grad_weight=grad_weight is not None,
            grad_weight_acc=grad_weight,
        )
        grads = torch.autograd.grad(
            normed, [trunk_out, *grad_params], result.grad_hidden.view(batch, seq, dim), allow_unused=True
        )
    return result.loss, grads[0], grads[1:]


def _losses_only(spec: _Spec, hidden: Tensor, weight: Tensor) -> Tensor:
    """(n,) per-head losses with no gradient computed (under no_grad, or nothing requires grad)."""
    batch, seq, dim = hidden.shape
    losses = []
    with torch.no_grad():
        for k, head in enumerate(spec.heads):
            result = fused_linear_cross_entropy(
                head(hidden).reshape(batch * seq, dim), weight, spec.targets.labels[k].reshape(-1),
                spec.targets.weights[k].reshape(-1),
                tp_group=spec.tp_group, vocab_start=spec.vocab_start, impl=spec.impl,
                chunk_size=spec.chunk_size, need_grad_hidden=False, need_grad_weight=False,
            )
            losses.append(result.loss)
    return torch.stack(losses)


class SequentialHeadsLoss(torch.autograd.Function):
    """forward: every head's forward + fused loss + backward, one after another; returns (loss, per-head
    losses). backward: the gradients stored by forward, times grad_output, for hidden, W and params."""

    @staticmethod
    def forward(ctx, spec: _Spec, hidden: Tensor, weight: Tensor, *params: Tensor):
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        grad_params: list[Tensor | None] = [None] * len(params)
        # fp32 sum of the heads' trunk gradients: n bf16 additions would each round.
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        head_losses = []
        for k in range(len(spec.heads)):
            loss_k, grad_h, grads = _run_head(spec, k, hidden, weight, [params[i] for i in trainable],
                                              grad_weight)
            grad_hidden += grad_h
            for i, g in zip(trainable, grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
            head_losses.append(loss_k)
            del grad_h, grads  # this head's activations and logits are freed here, before the next head
        ctx.grads = (grad_hidden.to(hidden.dtype), grad_weight, grad_params)
        head_losses = torch.stack(head_losses)
        ctx.mark_non_differentiable(head_losses)
        return head_losses.sum(), head_losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_head_losses: Tensor | None):
        if ctx.grads is None:
            raise RuntimeError("multi_token_loss: backward ran twice; its gradients were already used")
        grad_hidden, grad_weight, grad_params = ctx.grads
        ctx.grads = None  # hand the buffers to autograd, which can then keep them without a copy
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype))
                  for g in (grad_hidden, grad_weight, *grad_params)]
        return (None, *scaled)


def _validate(hidden: Tensor, heads: Sequence[Head], params: Sequence[Tensor], weight: Tensor,
              targets: HeadTargets | None) -> None:
    """The checks of both entry points (``targets`` None: ``multi_token_loss`` before it makes them)."""
    if hidden.dim() != 3:
        raise ValueError(f"multi_token_loss: hidden must be (B, T, d), got {tuple(hidden.shape)}")
    if len(heads) == 0:
        raise ValueError("multi_token_loss: needs at least one head")
    expected = (len(heads), *hidden.shape[:2])
    if targets is not None and (targets.labels.shape != expected or targets.weights.shape != expected):
        raise ValueError(f"multi_token_loss: targets {tuple(targets.labels.shape)} and weights "
                         f"{tuple(targets.weights.shape)} must be (n_heads, B, T) = {expected}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"multi_token_loss: unembed_weight must be (V_local, {hidden.shape[2]}), "
                         f"got {tuple(weight.shape)}")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("multi_token_loss: params must be deduplicated (a shared parameter listed twice "
                         "would receive its gradient twice)")
    if any(p is weight for p in params):
        raise ValueError("multi_token_loss: pass unembed_weight separately, not in params")


def multi_token_loss(
    hidden: Tensor,
    heads: Sequence[Head],
    params: Sequence[Tensor],
    unembed_weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    impl: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    partitioned: PartitionedParamsFactory | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum over heads of each head's masked mean cross-entropy, with sequential head backward.

    hidden (B, T, d): trunk output. heads: n callables, head k maps hidden -> final-normed hidden
    (B, T, d) and predicts ``labels[t + k]`` at position t (positions t >= T - k are masked out).
    params: every parameter the heads use, deduplicated (shared ones such as the final norm once).
    unembed_weight (V_local, d): this tensor-parallel rank's vocabulary rows from ``vocab_start``.
    labels (B, T): next-token labels (``ignore_index`` for none). loss_mask (B, T) float, aligned with
    labels: head k weights ``labels[t + k]`` by ``loss_mask[t + k]``. partitioned: finds and gathers
    the parameters that are partitioned outside their module's forward (``PartitionedParams``), if any.
    Returns (loss, differentiable; head_losses (n,), detached).
    """
    _validate(hidden, heads, params, unembed_weight, None)
    if labels.shape != hidden.shape[:2] or loss_mask.shape != hidden.shape[:2]:
        raise ValueError(f"multi_token_loss: labels {tuple(labels.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must be (B, T) = {tuple(hidden.shape[:2])}")
    targets = head_targets(labels, loss_mask, len(heads), ignore_index=ignore_index)
    return multi_token_loss_for_targets(hidden, heads, params, unembed_weight, targets, tp_group=tp_group,
                                        vocab_start=vocab_start, impl=impl, chunk_size=chunk_size,
                                        partitioned=partitioned)


def multi_token_loss_for_targets(
    hidden: Tensor,
    heads: Sequence[Head],
    params: Sequence[Tensor],
    unembed_weight: Tensor,
    targets: HeadTargets,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    impl: str = "auto",
    chunk_size: int | None = None,
    partitioned: PartitionedParamsFactory | None = None,
) -> tuple[Tensor, Tensor]:
    """``multi_token_loss`` with every head's targets and weights given (``head_targets``): the loss
    is ``sum_k sum_t weights[k, t] * CE_k(t)``. Returns (loss, head_losses (n,), detached)."""
    _validate(hidden, heads, params, unembed_weight, targets)
    spec = _Spec(tuple(heads), targets, tp_group, vocab_start, impl, chunk_size)
    part = (partitioned or _NothingPartitioned)([unembed_weight, *params])
    needs_grad = any(t.requires_grad for t in (hidden, unembed_weight, *params))
    if not (torch.is_grad_enabled() and needs_grad):
        part.gather()
        try:  # evaluation: the same losses, without any backward work
            head_losses = _losses_only(spec, hidden, unembed_weight)
        finally:
            part.release()
        return head_losses.sum(), head_losses
    if not part.params:
        return SequentialHeadsLoss.apply(spec, hidden, unembed_weight, *params)
    if not hidden.requires_grad:
        raise ValueError("multi_token_loss: with partitioned parameters the trunk output must require grad")
    hidden = _ReleaseInBackward.apply(hidden, part)
    part.gather()
    try:
        loss, head_losses = SequentialHeadsLoss.apply(spec, hidden, unembed_weight, *params)
    finally:
        part.release()
    return _GatherInBackward.apply(loss, part), head_losses


class _GatherInBackward(torch.autograd.Function):
    """forward: identity on the loss; backward: gather the partitioned parameters."""

    @staticmethod
    def forward(ctx, loss: Tensor, partitioned: PartitionedParams):
        ctx.partitioned = partitioned
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.partitioned.gather()
        return grad, None


class _ReleaseInBackward(torch.autograd.Function):
    """forward: identity on the trunk output; backward: partition the parameters again."""

    @staticmethod
    def forward(ctx, hidden: Tensor, partitioned: PartitionedParams):
        ctx.partitioned = partitioned
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.partitioned.release()
        return grad, None
