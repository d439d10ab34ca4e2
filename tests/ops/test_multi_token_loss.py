"""multi_token_loss (sequential head backward) against all heads materialised with one backward."""

import copy
import gc
import weakref

import pytest
import torch

from megafim.ops.multi_token_loss import multi_token_loss, shifted_targets
from tests.ops.naive import TOLERANCES, TinyHeads, assert_close, naive_loss, naive_multi_token_loss


def _batch(batch, seq, dim, vocab, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, dim, generator=gen) * 2 / dim**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    labels[0, 2] = -100
    mask = torch.rand(batch, seq, generator=gen).round().to(device)  # zeros and ones
    mask[:, -1] = 0.5  # a fractional weight
    return hidden, weight, labels, mask


def _compare(n, dtype, impl, batch=2, seq=7, dim=8, vocab=23, chunk=4, device="cpu"):
    hidden, weight, labels, mask = _batch(batch, seq, dim, vocab, dtype, device=device)
    heads = TinyHeads(n, dim, 12, seed=1, dtype=dtype).to(device)
    ref_heads = copy.deepcopy(heads).double()

    trunk_in = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    params = list(heads.parameters())
    loss, head_losses = multi_token_loss(trunk_in * 1.0, heads.callables(), params, w, labels, mask,
                                         impl=impl, chunk_size=chunk)
    (loss * 0.75).backward()  # grad_output != 1 scales every gradient

    trunk_ref = hidden.double().requires_grad_(True)
    w_ref = weight.double().requires_grad_(True)
    ref = naive_multi_token_loss(trunk_ref * 1.0, ref_heads.callables(), w_ref, labels, mask)
    (ref * 0.75).backward()

    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss"], "loss")
    assert head_losses.shape == (n,) and not head_losses.requires_grad
    for k, head in enumerate(ref_heads.callables()):
        normed = head(trunk_ref.detach())[:, : seq - k]
        assert_close(head_losses[k], naive_loss(normed, w_ref.detach(), labels[:, k:], mask[:, k:]),
                     tol["loss"], f"head {k} loss")
    assert_close(trunk_in.grad, trunk_ref.grad, tol["grad"], "grad hidden")
    assert_close(w.grad, w_ref.grad, tol["grad"], "grad unembedding")
    for (name, p), p_ref in zip(heads.named_parameters(), ref_heads.parameters()):
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert_close(p.grad, p_ref.grad, tol["grad"], f"grad {name}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_matches_naive_heads(n, dtype, impl):
    _compare(n, dtype, impl)


def test_odd_shapes_and_single_chunk():
    _compare(3, torch.float32, "torch", batch=3, seq=5, dim=6, vocab=101, chunk=None)


def test_head_beyond_sequence_contributes_nothing():
    # seq = 3 with 4 heads: head 3 has no target anywhere, so its loss is 0, not NaN.
    hidden, weight, labels, mask = _batch(1, 3, 8, 11, torch.float32)
    heads = TinyHeads(4, 8, 12, seed=1)
    _, head_losses = multi_token_loss(hidden.requires_grad_(True), heads.callables(),
                                      list(heads.parameters()), weight, labels, torch.ones(1, 3))
    assert head_losses[3].item() == 0.0 and torch.isfinite(head_losses).all()


def test_shifted_targets_align_mask_with_label():
    labels = torch.tensor([[10, 11, 12, 13]])
    mask = torch.tensor([[1.0, 0.0, 0.5, 1.0]])
    shifted, shifted_mask = shifted_targets(labels, mask, 2, -100)
    assert shifted.tolist() == [[12, 13, -100, -100]]
    assert shifted_mask.tolist() == [[0.5, 1.0, 0.0, 0.0]]


def test_each_head_is_freed_before_the_next_runs():
    """Only one head's activations live at a time: head k's output is gone when head k+1 starts."""
    hidden, weight, labels, mask = _batch(2, 6, 8, 13, torch.float32)
    heads = TinyHeads(4, 8, 12, seed=1)
    outputs: list[weakref.ref] = []

    def make(k):
        def head(x):
            gc.collect()
            assert all(ref() is None for ref in outputs), f"an earlier head is still alive at head {k}"
            out = heads.head(k, x)
            outputs.append(weakref.ref(out))
            return out
        return head

    loss, _ = multi_token_loss(hidden.requires_grad_(True), [make(k) for k in range(4)],
                               list(heads.parameters()), weight, labels, mask)
    loss.backward()
    assert len(outputs) == 4


def test_frozen_and_unused_params_get_no_gradient():
    hidden, weight, labels, mask = _batch(2, 5, 8, 13, torch.float32)
    heads = TinyHeads(2, 8, 12, seed=1)
    heads.norm.requires_grad_(False)
    unused = torch.nn.Parameter(torch.ones(3))
    loss, _ = multi_token_loss(hidden.requires_grad_(True), heads.callables(),
                               [*heads.parameters(), unused], weight.requires_grad_(True), labels, mask)
    loss.backward()
    assert heads.norm.grad is None and unused.grad is None
    assert heads.up[0].grad is not None and weight.grad is not None


@pytest.mark.parametrize("problem,match", [("dup", "deduplicated"), ("weight", "separately"),
                                           ("labels", "labels"), ("heads", "at least one head")])
def test_bad_input_is_rejected_clearly(problem, match):
    hidden, weight, labels, mask = _batch(2, 5, 8, 13, torch.float32)
    heads = TinyHeads(2, 8, 12, seed=1)
    params, callables = list(heads.parameters()), heads.callables()
    if problem == "dup":
        params = params + params[:1]
    elif problem == "weight":
        params = params + [weight]
    elif problem == "labels":
        labels = labels[:, :-1]
    else:
        callables = []
    with pytest.raises(ValueError, match=match):
        multi_token_loss(hidden, callables, params, weight, labels, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_float64_reference(dtype):
    _compare(4, dtype, "auto", batch=2, seq=150, dim=64, vocab=5003, chunk=128, device="cuda")


def test_no_grad_gives_the_same_losses_without_backward_work():
    hidden, weight, labels, mask = _batch(2, 7, 8, 23, torch.float32)
    heads = TinyHeads(3, 8, 12, seed=1)
    calls = []
    params = list(heads.parameters())
    callables = [lambda x, f=f: (calls.append(torch.is_grad_enabled()), f(x))[1] for f in heads.callables()]
    loss, head_losses = multi_token_loss(hidden.requires_grad_(True), callables, params, weight, labels, mask)
    with torch.no_grad():
        eval_loss, eval_head_losses = multi_token_loss(hidden, callables, params, weight, labels, mask)
    torch.testing.assert_close(eval_head_losses, head_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eval_loss, loss.detach(), rtol=1e-6, atol=1e-6)
    assert calls == [True] * 3 + [False] * 3  # the heads ran without building a graph the second time
