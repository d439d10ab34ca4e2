"""What FIM promises: undoable, the configured proportions, exact lengths and masks, determinism."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megafim.data import fim_reference as ref
from megafim.data.fim import FimConfig, FimTransform, unpermute
from tests.data.test_fim_equality import ALPHABET
from tests.data.test_fim_fixtures import fim_tokenizer, small_model, train_tool  # noqa: F401

docs_strategy = st.lists(st.lists(st.sampled_from(ALPHABET), max_size=60).map("".join), min_size=1, max_size=6)


def pack(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok.encode(d) + [tok.eod]
    return out


def test_splitmix64_matches_the_published_sequence():
    # splitmix64 seeded with 0 starts 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4 (Vigna's reference code).
    assert ref.splitmix64(0) == 0xE220A8397B1DCDAF
    assert ref.splitmix64(ref.GOLDEN) == 0x6E789E6AA1B965F4


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=docs_strategy, start=st.integers(0, 30), extra=st.integers(0, 40), seed=st.integers(0, 2**64 - 1),
       rate=st.sampled_from([0.5, 1.0]), spm_rate=st.sampled_from([0.0, 0.5, 1.0]))
def test_unpermute_gives_back_every_whole_piece(fim_tokenizer, docs, start, extra, seed, rate,  # noqa: F811
                                                spm_rate):
    tok = fim_tokenizer
    stream = pack(tok, docs)
    start = min(start, len(stream) - 1)
    ctx = np.asarray(stream[start:start + len(stream) // 2 + extra], dtype=np.int32)
    out = FimTransform(FimConfig(rate, spm_rate), tok)(ctx, seed=seed, epoch=0, index=1)
    original = [b"".join(tok.token_bytes[t] for t in p) for p in ref.split_pieces(ctx.tolist(), tok.eod)]
    restored = unpermute(out.tokens, tok)
    whole = len(restored) - 1  # the output's last piece may be cut off by the context's end...
    if len(ctx) and out.loss_mask[-1] == 0 and out.tokens[-1] == tok.fim_pad:
        whole += 1  # ...unless the output was padded
    assert restored[:whole] == original[:whole]
    # Where FIM happened, each re-encoded part is valid UTF-8 text on its own.
    for piece, mode in zip(ref.split_pieces(out.tokens.tolist(), tok.eod)[:whole], out.modes):
        if mode == "ar":
            assert tok.fim_prefix not in piece
            continue
        lead = piece.index(tok.fim_prefix)
        parts, cur = [], []
        for t in piece[lead + 1:]:
            if t in (tok.fim_suffix, tok.fim_middle):
                parts.append(cur)
                cur = []
            else:
                cur.append(t)
        parts.append(cur)
        assert len(parts) == 3
        for part in (parts[0], parts[2]) if mode == "psm" else (parts[2],):
            b"".join(tok.token_bytes[t] for t in part).decode("utf-8")  # raises if invalid


def test_proportions_match_the_rates(fim_tokenizer):  # noqa: F811
    tok = fim_tokenizer
    ctx = np.asarray(pack(tok, ["x = 1", "def f(): pass", "日本 😀"] * 30)[:200], dtype=np.int32)
    pieces = ref.split_pieces(ctx.tolist(), tok.eod)
    nonempty = [k for k, p in enumerate(pieces) if p]  # an empty piece has nothing to fill: never FIM
    for rate, spm_rate in [(0.5, 0.5), (0.9, 0.2)]:
        t = FimTransform(FimConfig(rate=rate, spm_rate=spm_rate), tok)
        outs = [t(ctx, seed=11, epoch=0, index=i).modes for i in range(400)]
        assert all(len(m) == len(pieces) for m in outs)
        modes = [m[k] for m in outs for k in nonempty]
        n = len(modes)
        assert n > 10000
        fim = sum(m != "ar" for m in modes)
        spm = sum(m == "spm" for m in modes)
        # 5 standard deviations of a binomial: fails by chance about once in 3 million runs.
        assert abs(fim / n - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
        assert abs(spm / fim - spm_rate) < 5 * np.sqrt(spm_rate * (1 - spm_rate) / fim)


def test_output_depends_only_on_seed_epoch_index(fim_tokenizer):  # noqa: F811
    tok = fim_tokenizer
    ctx = np.asarray(pack(tok, ["a = [1, 2]\nb = a", "print('日本')", "  x  "] * 20)[:300], dtype=np.int64)
    cfg = FimConfig(rate=0.9)
    a, b = FimTransform(cfg, tok), pickle.loads(pickle.dumps(cfg))
    b = FimTransform(b, tok)
    keys = [(s, e, i) for s in (0, 7) for e in (0, 3) for i in range(25)]
    first = {k: a(ctx, seed=k[0], epoch=k[1], index=k[2]) for k in keys}
    with ThreadPoolExecutor(2) as pool:  # another object, other threads, the reverse order
        again = dict(zip(keys[::-1], pool.map(lambda k: b(ctx, seed=k[0], epoch=k[1], index=k[2]), keys[::-1])))
    for k in keys:
        np.testing.assert_array_equal(first[k].tokens, again[k].tokens)
        np.testing.assert_array_equal(first[k].loss_mask, again[k].loss_mask)
        assert first[k].modes == again[k].modes
    distinct = {first[k].tokens.tobytes() for k in keys}
    assert len(distinct) > len(keys) * 0.8  # seed, epoch and index all change the draw


@pytest.mark.parametrize("mask_sentinels", [False, True])
def test_lengths_and_masks(fim_tokenizer, mask_sentinels):  # noqa: F811
    tok = fim_tokenizer
    sentinels = [tok.fim_prefix, tok.fim_middle, tok.fim_suffix]
    stream = pack(tok, ["x", "", "y = 2", "日"] * 50)
    t = FimTransform(FimConfig(rate=1.0, mask_sentinels=mask_sentinels), tok)
    padded = 0
    for index, length in enumerate([1, 2, 3, 8, 33, 129]):
        for start in range(0, 40, 3):
            ctx = np.asarray(stream[start:start + length], dtype=np.int32)
            out = t(ctx, seed=1, epoch=0, index=index)
            assert len(out.tokens) == len(out.loss_mask) == len(out.middle_mask) == length
            toks = out.tokens
            assert np.all(out.loss_mask[toks == tok.eod] == 1)  # end-of-text is always a target
            assert np.all(out.loss_mask[np.isin(toks, sentinels)] == (0 if mask_sentinels else 1))
            pad = toks == tok.fim_pad
            assert np.all(out.loss_mask[pad] == 0) and not np.any(out.middle_mask[pad])
            if pad.any():  # padding only ever fills the tail
                padded += 1
                assert np.all(pad[int(np.argmax(pad)):])
            assert not np.any(out.middle_mask & np.isin(toks, sentinels + [tok.eod]))
            assert np.all(out.loss_mask[~pad & ~np.isin(toks, sentinels)] == 1)
    # 1-character documents grow by 3 sentinels, so nothing here is ever padded at rate 1.
    assert padded == 0


def test_document_level_keeps_every_piece_in_place(fim_tokenizer):  # noqa: F811
    tok = fim_tokenizer
    stream = pack(tok, ["def f(x):\n    return x * 2\n", "a", "import os\nprint(os.sep)  # é"] * 10)
    ctx = np.asarray(stream[5:400], dtype=np.int32)
    t = FimTransform(FimConfig(rate=1.0, level="document"), tok)
    for index in range(30):
        out = t(ctx, seed=2, epoch=0, index=index)
        np.testing.assert_array_equal(np.flatnonzero(out.tokens == tok.eod), np.flatnonzero(ctx == tok.eod))
        assert "ar" in out.modes and "psm" in out.modes  # "a" cannot take 3 sentinels and stays as is
        for piece, original, mode in zip(ref.split_pieces(out.tokens.tolist(), tok.eod),
                                         ref.split_pieces(ctx.tolist(), tok.eod), out.modes):
            assert len(piece) == len(original)
            if mode == "ar":
                assert piece == original


def test_rate_zero_is_the_identity(fim_tokenizer):  # noqa: F811
    tok = fim_tokenizer
    ctx = np.asarray(pack(tok, ["x = 1", "日本 😀"] * 10), dtype=np.int64)
    out = FimTransform(FimConfig(rate=0.0), tok)(ctx, seed=0, epoch=0, index=0)
    np.testing.assert_array_equal(out.tokens, ctx)
    assert out.loss_mask.all() and not out.middle_mask.any() and set(out.modes) == {"ar"}


@pytest.mark.parametrize("kwargs, field", [
    (dict(rate=1.5), "rate"), (dict(rate=-0.1), "rate"), (dict(spm_rate=2), "spm_rate"),
    (dict(rate="0.5"), "rate"), (dict(level="file"), "level"), (dict(mask_sentinels=1), "mask_sentinels")])
def test_config_is_validated(kwargs, field):
    with pytest.raises(ValueError, match=f"FimConfig.{field}"):
        FimConfig(**kwargs)


def test_pickled_transform_gives_the_same_samples(fim_tokenizer):  # noqa: F811
    """DataLoader workers started with "spawn" receive a pickled copy."""
    t = FimTransform(FimConfig(rate=0.9, spm_rate=0.3), fim_tokenizer)
    copy = pickle.loads(pickle.dumps(t))
    assert copy.config == t.config and copy.native_encoder == t.native_encoder
    ctx = np.asarray(pack(fim_tokenizer, ["def g(y):\n    return y", "日本 😀 x"] * 8), dtype=np.int64)
    for index in range(10):
        a, b = t(ctx, seed=4, epoch=1, index=index), copy(ctx, seed=4, epoch=1, index=index)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert a.modes == b.modes
