"""Intra-document attention (--reset-attention-mask, --reset-position-ids) against its definition:
a packed, document-masked context trains exactly like each of its documents run on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megafim.data.fim import FimConfig, FimTransform
from megafim.data.gpt_dataset import document_segments
from megafim.model import GPT, model_config
from megafim.model.documents import Documents, token_layout
from megafim.model.attention import document_attention
from tests.data.test_fim_fixtures import fim_tokenizer, small_model, train_tool  # noqa: F401

TEXTS = ["def add(a, b):\n    return a + b\n", "class A:\n    x = 1\n    def f(self):\n        pass\n",
         "import os\nprint(os.getcwd())\n", "for i in range(10):\n    print(i * i)\n",
         "x = [1, 2, 3]\ny = {k: v for k, v in zip(x, x)}\n", "# a comment\nwhile True:\n    break\n"]
N_FUTURE = 4


def fim_contexts(tok, seq: int, batch: int) -> list[dict[str, np.ndarray]]:
    """``batch`` packed contexts of seq + 1 tokens, FIM'd as the dataset does (rate 0.8)."""
    fim = FimTransform(FimConfig(rate=0.8, spm_rate=0.5), tok)
    stream = [t for i in range(40) for t in tok.encode(TEXTS[(7 * i) % len(TEXTS)]) + [tok.eod]]
    out = []
    for b in range(batch):
        ctx = np.asarray(stream[b * seq: b * seq + seq + 1], dtype=np.int64)
        r = fim(ctx, seed=3, epoch=0, index=b)
        out.append({"ctx": r.tokens, "loss_mask": r.loss_mask})
    return out


def tiny_model():
    torch.manual_seed(0)
    return GPT(model_config("tiny", vocab_size=2048, n_future=N_FUTURE, max_seq_len=128))


def _standalone_loss(model: GPT, contexts, eod: int) -> torch.Tensor:
    """The slow definition: split each context after every end-of-text token and run each document
    alone (positions from 0, no other document in sight); head k's loss is the masked mean over all
    documents of CE(logits_k[t], doc[t + k + 1])."""
    sums, counts = torch.zeros(N_FUTURE), torch.zeros(N_FUTURE)
    for c in contexts:
        ctx, mask = torch.as_tensor(c["ctx"]), torch.as_tensor(c["loss_mask"])
        ends = [i + 1 for i, t in enumerate(ctx.tolist()) if t == eod and i + 1 < len(ctx)]
        for a, b in zip([0, *ends], [*ends, len(ctx)]):
            doc = ctx[a:b]
            if len(doc) < 2:
                continue
            logits = model.logits(doc[None, :-1])  # (n, 1, L, V)
            length = len(doc) - 1
            for k in range(min(N_FUTURE, length)):
                ce = F.cross_entropy(logits[k, 0, : length - k], doc[k + 1:], reduction="none")
                m = mask[a + k + 1: b]
                sums[k] = sums[k] + (ce * m).sum()
                counts[k] += m.sum()
    return (sums / counts).sum()


def packed_batch(contexts, eod: int) -> dict[str, torch.Tensor]:
    ctx = torch.as_tensor(np.stack([c["ctx"] for c in contexts]))
    mask = torch.as_tensor(np.stack([c["loss_mask"] for c in contexts]))
    seg, label_seg = zip(*(document_segments(c["ctx"], eod) for c in contexts))
    return {"tokens": ctx[:, :-1], "labels": ctx[:, 1:], "loss_mask": mask[:, 1:],
            "segment_ids": torch.as_tensor(np.stack(seg)), "label_segment_ids": torch.as_tensor(np.stack(label_seg))}


def _grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_rel(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    err = (a - b).norm() / b.norm().clamp_min(1e-30)
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def test_packed_masked_context_equals_documents_alone(fim_tokenizer):  # noqa: F811
    tok = fim_tokenizer
    contexts = fim_contexts(tok, seq=96, batch=2)
    assert any(c["ctx"].tolist().count(tok.fim_middle) for c in contexts), "no FIM piece in the batch"
    batch = packed_batch(contexts, tok.eod)
    assert int(batch["segment_ids"][0].max()) >= 3  # several documents per context

    model = tiny_model()
    ref = _standalone_loss(model, contexts, tok.eod)
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()

    docs = Documents(batch["segment_ids"], batch["label_segment_ids"], mask_attention=True, reset_positions=True)
    out = model(batch["tokens"], batch["labels"], batch["loss_mask"], documents=docs)
    out.loss.backward()
    _assert_rel(out.loss.detach(), ref.detach(), "loss")
    for name, g in _grads(model).items():
        _assert_rel(g, ref_grads[name], f"grad {name}")

    # without the documents the same batch attends across them: far outside the tolerance above
    plain = model(batch["tokens"], batch["labels"], batch["loss_mask"]).loss
    assert not math.isclose(plain.item(), ref.item(), rel_tol=1e-4)


def test_label_in_a_later_document_is_masked_per_head():
    # tokens 0..7, documents [0, 1, 2 | 3, 4 | 5, 6, 7]; labels are the next tokens
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    label_seg = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2]])  # the label of position 2 opens document 1
    from megafim.ops.multi_token_loss import head_targets

    labels = torch.arange(1, 9)[None]
    t = head_targets(labels, torch.ones(1, 8), 3, segment_ids=seg, label_segment_ids=label_seg)
    kept = (t.weights > 0).int()[:, 0].tolist()
    assert kept[0] == [1, 1, 0, 1, 0, 1, 1, 1]  # head 0: predicting across a boundary is dropped
    assert kept[1] == [1, 0, 0, 0, 0, 1, 1, 0]  # head 1: t+1 must stay in t's document
    assert kept[2] == [0, 0, 0, 0, 0, 1, 0, 0]
    assert torch.allclose(t.weights.sum(dim=(1, 2)), torch.ones(3))  # each head's masked mean


def _naive_masked_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(hd) where allowed, else -inf) v, with GQA by repeating key/value heads."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_document_attention_is_the_masked_softmax():
    g = torch.Generator().manual_seed(0)
    b, t, h, hkv, hd = 2, 12, 4, 2, 8
    q, k, v = (torch.randn(b, t, n, hd, generator=g, dtype=torch.float64) for n in (h, hkv, hkv))
    seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
    docs = Documents(seg, seg, mask_attention=True, reset_positions=False)
    layout = token_layout(docs, t, device=q.device)
    pos = torch.arange(t)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[None, :, None] >= pos[None, None, :])
    torch.testing.assert_close(document_attention(q, k, v, layout), _naive_masked_attention(q, k, v, allowed))
    # positions run on across documents unless reset
    assert layout.rope_positions.tolist()[0] == list(range(t))
    reset = token_layout(Documents(seg, seg, mask_attention=False, reset_positions=True), t)
    assert reset.rope_positions.tolist()[0] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2] and reset.query_segments is None


def test_reset_positions_alone_keeps_one_document_unchanged():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 2000, (2, 20), generator=g)
    labels = torch.randint(0, 2000, (2, 20), generator=g)
    one = torch.zeros(2, 20, dtype=torch.long)
    for mask_attention in (False, True):
        docs = Documents(one, one, mask_attention=mask_attention, reset_positions=True)
        torch.testing.assert_close(model(tokens, labels, documents=docs).loss, model(tokens, labels).loss)


@pytest.mark.parametrize("tokens, expected", [
    ([5, 9, 2, 7, 9, 9, 3], ([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 3])),  # eod = 9
    ([1, 2, 3], ([0, 0], [0, 0])),
])
def test_document_segments(tokens, expected):
    seg, label_seg = document_segments(np.asarray(tokens), 9)
    assert (seg.tolist(), label_seg.tolist()) == expected
