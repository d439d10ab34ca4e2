"""AR / FIM / middle-only loss evaluation: exact against a naive computation, masks and counts right; under
the document mask, a packed context scores as its documents scored one by one."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megafim.data.fim import FimConfig, FimTransform
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec
from megafim.data.indexed import IndexedDatasetBuilder
from megafim.data.tokenizer import Tokenizer
from megafim.eval.loss import KINDS, DocumentMask, evaluate_losses, format_table, left_to_right_middles, score
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def tiny(vocab, n_future=2):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           ffn_hidden_size=64, max_seq_len=128, n_future=n_future)).eval()


@pytest.fixture(scope="module")
def heldout(small_tokenizer_path, tmp_path_factory):
    tok = Tokenizer.from_file(small_tokenizer_path)
    prefix = tmp_path_factory.mktemp("heldout") / "heldout"
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for path in sorted((STDLIB / "json").glob("*.py")):
            builder.add_document(np.asarray(tok.encode(path.read_text()) + [tok.eod]))
    return tok, str(prefix)


@pytest.fixture(scope="module")
def short_documents(small_tokenizer_path, tmp_path_factory):
    """Held-out data of short documents (the blocks between blank lines of a stdlib file), so that a
    context packs several."""
    tok = Tokenizer.from_file(small_tokenizer_path)
    prefix = tmp_path_factory.mktemp("short_documents") / "heldout"
    blocks = [b for b in (STDLIB / "json" / "encoder.py").read_text().split("\n\n") if b.strip()]
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for block in blocks:
            builder.add_document(np.asarray(tok.encode(block) + [tok.eod]))
    return tok, str(prefix)


def test_score_equals_naive_cross_entropy():
    model = tiny(50, n_future=3)
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 50, (2, 20), generator=g), torch.randint(0, 50, (2, 20), generator=g)
    mask = (torch.rand(2, 20, generator=g) > 0.3).float()
    nats, counts = score(model, tokens, labels, mask)
    with torch.no_grad():
        logits = model.logits(tokens)  # (n, B, T, V)
    for k in range(3):
        ce = F.cross_entropy(logits[k, :, : 20 - k].reshape(-1, 50), labels[:, k:].reshape(-1), reduction="none")
        m = mask[:, k:].reshape(-1)
        assert counts[k] == int(m.sum())
        assert nats[k] == pytest.approx(float((ce * m).sum()), rel=1e-4)


def test_left_to_right_rearrangement(heldout):
    tok, _ = heldout
    p, s, m = tok.encode("def f(x):"), tok.encode("\n    return y\n"), tok.encode("\n    y = x")
    psm = [tok.fim_prefix, *p, tok.fim_suffix, *s, tok.fim_middle, *m, tok.eod]
    empty_prefix = [tok.fim_prefix, tok.fim_suffix, *s, tok.fim_middle, *m, tok.eod]
    plain = tok.encode("x = 1\n") + [tok.eod]
    cut = psm[: len(p) + len(s) + 4]  # cut by the context's end one token into its middle
    ctx = np.asarray(plain + psm + empty_prefix + psm[:5] + [tok.eod] + cut)
    out, middle = left_to_right_middles(ctx, tok)
    assert len(out) == len(ctx)
    expected = [tok.eod, *p, *m, tok.eod, *m, tok.eod, *p, m[0], tok.eod]
    assert out[: len(expected)].tolist() == expected
    assert middle[: len(expected)].tolist() == ([False] + [False] * len(p) + [True] * len(m) + [False]
                                                 + [True] * len(m) + [False] + [False] * len(p) + [True, False])
    assert (out[len(expected):] == tok.fim_pad).all() and not middle[len(expected):].any()
    # bytes of a character cut by the context's start stay before <fim_prefix>: they precede the prefix
    byte = tok.encode("\u00e9")[0]
    out, middle = left_to_right_middles(np.asarray([byte, *psm]), tok)
    assert out[: len(p) + len(m) + 3].tolist() == [tok.eod, byte, *p, *m, tok.eod]
    assert middle.sum() == len(m)


def test_evaluate_losses_report(heldout):
    tok, prefix = heldout
    model = tiny(tok.vocab_size)
    report = evaluate_losses(model, tok, prefix, seq_length=64, num_samples=6, batch_size=4)
    assert set(report.losses) == set(KINDS) and report.samples == 6
    d = report.as_dict()
    assert d["ar"]["tokens"] == 6 * 64  # every target of every AR sample
    for kind in KINDS:
        assert len(d[kind]["per_head"]) == 2
        assert np.isfinite(d[kind]["loss"]), kind
    assert 0 < d["middle_psm"]["tokens"] < d["fim_psm"]["tokens"]
    assert d["middle_ar"]["tokens"] == d["middle_psm"]["tokens"]  # the same middle tokens, scored L-to-R
    # a random model is near-uniform: every loss is close to log(vocab)
    assert abs(d["ar"]["loss"] - np.log(tok.vocab_size)) < 0.5
    assert "middle_ar" in format_table(report)


def test_progress_counts_three_passes_over_the_contexts(heldout):
    tok, prefix = heldout
    calls = []
    evaluate_losses(tiny(tok.vocab_size), tok, prefix, seq_length=64, num_samples=6, batch_size=4,
                    progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 18), (6, 18), (10, 18), (12, 18), (16, 18), (18, 18)]


def _documents_alone(model, tokens, labels, mask, eod):
    """Reference for the document mask: every document of every context (cut at end-of-text, which
    ends its document) scored on its own, plain causal attention from position 0. Summed nats and
    target counts per head."""
    n = model.config.n_future
    nats, counts = [0.0] * n, [0] * n
    for t, lab, m in zip(tokens, labels, mask):
        ctx, weight = torch.cat([t[:1], lab]), torch.cat([m[:1], m])  # weight[i]: that of token i as a label
        ends = [i + 1 for i in torch.nonzero(ctx[:-1] == eod).flatten().tolist()]  # a document starts after
        for start, stop in zip([0, *ends], [*ends, len(ctx)]):
            if stop - start < 2:
                continue  # one token, nothing to predict
            doc = ctx[start:stop]
            a, b = score(model, doc[None, :-1], doc[None, 1:], weight[None, start + 1:stop])
            nats, counts = [x + y for x, y in zip(nats, a)], [x + y for x, y in zip(counts, b)]
    return nats, counts


@pytest.mark.parametrize("reset_positions", [True, False])
def test_document_mask_scores_a_packed_context_as_its_documents_alone(short_documents, reset_positions):
    """fp32: AR, PSM and middle-only losses of packed contexts under the document mask equal the
    token-weighted mean over their documents scored one by one (a FIM piece is one document). Without
    restarting positions the documents' rotary offsets differ, which relative attention does not see."""
    tok, prefix = short_documents
    model = tiny(tok.vocab_size)
    seq, count = 96, 6
    mask = DocumentMask(reset_attention_mask=True, reset_position_ids=reset_positions)
    report = evaluate_losses(model, tok, prefix, seq_length=seq, num_samples=count, batch_size=4,
                             document_mask=mask)
    spec = GPTDatasetSpec(prefix, seq, 1234, num_samples=None, split_name="eval", shuffle=False)
    psm = GPTDataset(spec, fim=FimTransform(FimConfig(rate=1.0, spm_rate=0.0), tok))
    plain = GPTDataset(spec, fim=None)
    samples = {"ar": [plain[i] for i in range(count)], "fim_psm": [psm[i] for i in range(count)]}
    n_docs = 0
    for kind, items in samples.items():
        tokens, labels = torch.stack([s["tokens"] for s in items]), torch.stack([s["labels"] for s in items])
        weights = {kind: torch.stack([s["loss_mask"] for s in items])}
        if kind == "fim_psm":
            weights["middle_psm"] = weights[kind] * torch.stack([s["middle_mask"] for s in items]).float()
        n_docs += int((labels == tok.eod).sum())
        for name, w in weights.items():
            nats, counts = _documents_alone(model, tokens, labels, w, tok.eod)
            got = report.losses[name]
            assert got.tokens == counts, name
            assert got.mean == pytest.approx([a / b for a, b in zip(nats, counts)], rel=1e-5), name
    assert n_docs >= 2 * count  # the contexts pack several documents
    causal = evaluate_losses(model, tok, prefix, seq_length=seq, num_samples=count, batch_size=4)
    assert causal.losses["ar"].tokens[0] > report.losses["ar"].tokens[0]  # the mask is not a no-op
    assert report.as_dict()["reset_attention_mask"] and not causal.as_dict()["reset_attention_mask"]
