"""The fused linear cross-entropy against a naive float64 reference (full logits, F.cross_entropy).

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py): shapes stay tiny.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megafim.ops.linear_cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy,
)
from tests.ops.naive import TOLERANCES, assert_close, naive_loss

IMPLS = ["torch", "triton"]


def _inputs(n_tokens, dim, vocab, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, dim, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, dim, generator=gen) * 2 / dim**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen).to(device)
    mask = (torch.rand(n_tokens, generator=gen) * 1.5).clamp(max=1.0).to(device)  # some weights < 1
    mask[::5] = 0.0
    labels[1::7] = -100
    return hidden, weight, labels, mask


def _check(impl, dtype, n_tokens, dim, vocab, chunk, reduction="mean", use_mask=True, device="cpu"):
    hidden, weight, labels, mask = _inputs(n_tokens, dim, vocab, dtype, device=device)
    mask = mask if use_mask else None
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, mask, reduction=reduction, impl=impl, chunk_size=chunk)
    (loss * 1.7).backward()  # a grad_output != 1 must scale both gradients

    h_ref = hidden.double().requires_grad_(True)
    w_ref = weight.double().requires_grad_(True)
    ref = naive_loss(h_ref, w_ref, labels, mask, reduction=reduction)
    (ref * 1.7).backward()
    tol = TOLERANCES[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, tol["loss"], "loss")
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(h.grad, h_ref.grad, tol["grad"], "grad hidden")
    assert_close(w.grad, w_ref.grad, tol["grad"], "grad weight")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens,dim,vocab,chunk", [(29, 16, 37, 8), (16, 8, 64, None), (5, 24, 131, 2)])
def test_matches_naive(impl, dtype, n_tokens, dim, vocab, chunk):
    _check(impl, dtype, n_tokens, dim, vocab, chunk)


@pytest.mark.parametrize("impl", IMPLS)
def test_sum_reduction_without_mask(impl):
    _check(impl, torch.float32, 19, 8, 33, 7, reduction="sum", use_mask=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_wider_than_one_kernel_block(impl):
    # 4100 columns: the kernels' column loop runs twice (block 4096) with a ragged tail.
    _check(impl, torch.float32, 3, 8, 4100, 2)


def test_triton_and_torch_paths_agree():
    """The kernel and the reference do the same arithmetic on the same fp32 chunks."""
    hidden, weight, labels, mask = _inputs(11, 8, 29, torch.float32)
    weights = mask * (labels != -100)
    a = fused_linear_cross_entropy(hidden, weight, labels, weights, impl="torch", chunk_size=4)
    b = fused_linear_cross_entropy(hidden, weight, labels, weights, impl="triton", chunk_size=4)
    for x, y, what in [(a.loss, b.loss, "loss"), (a.grad_hidden, b.grad_hidden, "grad hidden"),
                       (a.grad_weight, b.grad_weight, "grad weight")]:
        assert_close(y, x, 2e-6, what)


def test_all_masked_batch_gives_zero_loss_and_gradients():
    hidden, weight, labels, _ = _inputs(6, 8, 13, torch.float32)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, torch.zeros(6), impl="torch")
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_grad_weight_accumulator_is_added_to():
    hidden, weight, labels, mask = _inputs(9, 8, 17, torch.float32)
    acc = torch.ones_like(weight)
    res = fused_linear_cross_entropy(hidden, weight, labels, mask, impl="torch", grad_weight_acc=acc)
    alone = fused_linear_cross_entropy(hidden, weight, labels, mask, impl="torch")
    assert res.grad_weight is acc
    torch.testing.assert_close(acc, alone.grad_weight + 1)


def test_only_requested_gradients_are_computed():
    hidden, weight, labels, mask = _inputs(9, 8, 17, torch.float32)
    res = fused_linear_cross_entropy(hidden, weight, labels, mask, need_grad_hidden=False,
                                     need_grad_weight=False)
    assert res.grad_hidden is None and res.grad_weight is None
    w = weight.clone().requires_grad_(True)
    linear_cross_entropy(hidden, w, labels, mask).backward()  # hidden needs no gradient
    assert w.grad is not None


def test_default_chunk_size_arithmetic():
    # bf16, V = 128256: 256 MiB / 256512 B = 1046 rows -> 1024; V = 32000 -> 4096; capped by N.
    assert default_chunk_size(16384, 128256, 2) == 1024
    assert default_chunk_size(16384, 32000, 2) == 4096
    assert default_chunk_size(100, 32000, 2) == 100  # one chunk holds every row
    assert default_chunk_size(1 << 20, 10**9, 4) == 16  # never below 16 rows


@pytest.mark.parametrize("bad,match", [
    (dict(hidden=torch.zeros(4, 3)), "hidden must be"),
    (dict(weight=torch.zeros(5, 8, dtype=torch.float64)), "share dtype"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), "labels"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(vocab_start=-1), "vocab_start"),
])
def test_bad_input_is_rejected_clearly(bad, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(5, 8), labels=torch.zeros(4, dtype=torch.long),
                weights=torch.ones(4))
    opts = {k: bad.pop(k) for k in list(bad) if k in ("impl", "chunk_size", "vocab_start")}
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(**args, **opts)


def test_backward_twice_is_an_error():
    hidden, weight, labels, mask = _inputs(4, 8, 9, torch.float32)
    loss = linear_cross_entropy(hidden.requires_grad_(True), weight, labels, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens,dim,vocab,chunk", [(300, 128, 32003, 128), (1024, 256, 4096, None)])
def test_gpu_triton_matches_float64_reference(dtype, n_tokens, dim, vocab, chunk):
    _check("triton", dtype, n_tokens, dim, vocab, chunk, device="cuda")


def _check_autocast(impl, device):
    """fp32 inputs inside a bf16 autocast region (fp32 master weights, bf16 compute): the products
    run in bf16 and the gradients come back in fp32, within bf16's tolerance of float64."""
    hidden, weight, labels, mask = _inputs(37, 16, 45, torch.float32, seed=3, device=device)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, mask, impl=impl, chunk_size=8)
    loss.backward()
    h_ref, w_ref = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    naive_loss(h_ref, w_ref, labels, mask).backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    tol = TOLERANCES[torch.bfloat16]
    assert_close(loss, naive_loss(hidden.double(), weight.double(), labels, mask), tol["loss"], "loss")
    assert_close(h.grad, h_ref.grad, tol["grad"], "grad hidden")
    assert_close(w.grad, w_ref.grad, tol["grad"], "grad weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_inputs_under_bf16_autocast(impl):
    _check_autocast(impl, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32_inputs_under_bf16_autocast():
    _check_autocast("triton", "cuda")



def test_no_grad_gives_the_same_loss():
    hidden, weight, labels, mask = _inputs(13, 8, 21, torch.float32)
    with_grad = linear_cross_entropy(hidden.clone().requires_grad_(True), weight, labels, mask, chunk_size=4)
    with torch.no_grad():
        without = linear_cross_entropy(hidden.requires_grad_(True), weight, labels, mask, chunk_size=4)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())


@settings(max_examples=25, deadline=None)
@given(n_tokens=st.integers(1, 40), dim=st.integers(1, 12), vocab=st.integers(2, 70),
       chunk=st.one_of(st.none(), st.integers(1, 50)), reduction=st.sampled_from(["mean", "sum"]))
def test_random_shapes_match_naive(n_tokens, dim, vocab, chunk, reduction):
    _check("torch", torch.float32, n_tokens, dim, vocab, chunk, reduction=reduction)
