"""The C++ fast path equals the slow definition (fim_reference.py) exactly, on random contexts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megafim.data.fim import FimConfig, FimResult, FimTransform
from megafim.data.fim_reference import piece_key, transform_piece
from tests.data.test_fim_fixtures import fim_tokenizer, fim_tokenizer_sp, small_model, train_tool  # noqa: F401

# Plain ASCII, runs of spaces, tabs and newlines, accented letters the tokenizer has seen, and
# characters it never saw (byte fallback: 2-, 3- and 4-byte sequences).
ALPHABET = list("abcdefxyz_=(): .,#'\"0123456789") + [" ", "  ", "    ", "\n", "\t"] + list(
    "éüöä日本語π≈½—") + ["😀", "∮", "ᚠ", "𝔘", "Ω", "ß", "\u00a0", "\u2028"]

texts = st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join)


@st.composite
def contexts(draw, tok):
    """A window of a packed stream of documents: it may start and end inside a document, a word or
    a character, hold empty documents, and sometimes a stray raw byte (documents are otherwise the
    tokenizer's own encoding, as preprocessing writes them: docs/fim.md)."""
    docs = draw(st.lists(texts, min_size=1, max_size=8))
    stream: list[int] = []
    for d in docs:
        ids = tok.encode(d)
        if draw(st.integers(0, 7)) == 0:  # garbage: one stray byte (never a whole character)
            at = draw(st.integers(0, len(ids)))
            ids[at:at] = [draw(st.sampled_from(raw_bytes(tok)))]
        stream += ids
        stream.append(tok.eod)
    start = draw(st.integers(0, len(stream) - 1))
    length = draw(st.integers(0, len(stream) - start))
    return np.asarray(stream[start:start + length], dtype=np.int32)


STRAY = (0x80, 0xA0, 0xBF, 0xC3, 0xE2, 0xF0, 0xC0, 0xFF)  # lead, continuation and never-valid bytes


def raw_bytes(tok) -> list[int]:
    """Byte-fallback ids of a few lead, continuation and never-valid bytes."""
    ids = [i for i, b in enumerate(tok.token_bytes) if len(b) == 1 and b[0] in STRAY]
    assert len(ids) == 8
    return ids


def assert_same(fast, slow):
    assert fast.modes == slow.modes
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_array_equal(fast.loss_mask, slow.loss_mask)
    np.testing.assert_array_equal(fast.middle_mask, slow.middle_mask)
    assert fast.tokens.dtype == np.int64 and fast.loss_mask.dtype == np.float32
    assert fast.middle_mask.dtype == np.bool_


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=st.integers(0, 2**64 - 1), epoch=st.integers(0, 50), index=st.integers(0, 2**40),
       rate=st.sampled_from([0.0, 0.5, 0.9, 1.0]), spm_rate=st.sampled_from([0.0, 0.5, 1.0]),
       level=st.sampled_from(["context", "document"]), mask_sentinels=st.booleans())
def test_fast_path_equals_definition(fim_tokenizer, data, seed, epoch, index, rate, spm_rate, level,  # noqa: F811
                                     mask_sentinels):
    ctx = data.draw(contexts(fim_tokenizer))
    t = FimTransform(FimConfig(rate, spm_rate, level, mask_sentinels), fim_tokenizer)
    fast = t(ctx, seed=seed, epoch=epoch, index=index)
    assert len(fast.tokens) == len(ctx)
    assert_same(fast, t.reference(ctx, seed=seed, epoch=epoch, index=index))
    # The data loader's entry (GPTDataset.__getitem__): the same arrays, from any stored dtype.
    for dtype in (np.uint16, np.int32, np.int64):
        tokens, loss, middle = t.sample(ctx.astype(dtype), seed, epoch, index)
        assert_same(FimResult(tokens, loss, middle, fast.modes), fast)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.integers(0, 45),
       strays=st.lists(st.tuples(st.integers(0, 200), st.sampled_from(STRAY)), max_size=2),
       seed=st.integers(0, 2**64 - 1), level=st.sampled_from(["context", "document"]))
@example(words=0, strays=[(31, 0xC3), (96, 0x80)], seed=1, level="context")  # blocks 0 and 3 hold them
def test_long_pieces_with_bytes_in_some_blocks(fim_tokenizer, words, strays, seed, level):  # noqa: F811
    """Characters are counted per block of 32 tokens; only blocks holding a byte-fallback token are
    checked byte by byte. A character spelled in byte tokens at any place (across a block edge too),
    and stray bytes anywhere in a piece of whole-character blocks (a lead byte, then blocks of whole
    characters, then a continuation byte is no character): as the definition."""
    tok = fim_tokenizer
    ids = tok.encode("a b" * words) + tok.encode("😀") + tok.encode(" c d" * 60)
    assert sum(len(tok.token_bytes[i]) == 1 and tok.token_bytes[i][0] >= 0x80 for i in ids) == 4
    for at, byte in strays:
        ids.insert(min(at, len(ids)), tok.token_bytes.index(bytes([byte])))
    ctx = np.asarray([tok.eod] + ids + [tok.eod] + tok.encode("x = 1"), dtype=np.int32)
    t = FimTransform(FimConfig(1.0, 0.5, level), tok)
    fast = t(ctx, seed=seed, epoch=0, index=0)
    assert_same(fast, t.reference(ctx, seed=seed, epoch=0, index=0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\u2581"), max_size=60),
       seed=st.integers(0, 2**64 - 1), spm_rate=st.sampled_from([0.0, 1.0]))
def test_any_unicode_text(fim_tokenizer, text, seed, spm_rate):  # noqa: F811
    """Arbitrary code points (surrogates excluded by the codec) as one whole document, always FIM."""
    tok = fim_tokenizer
    ctx = np.asarray([tok.eod] + tok.encode(text) + [tok.eod] + tok.encode(text[::-1]), dtype=np.int32)
    t = FimTransform(FimConfig(rate=1.0, spm_rate=spm_rate), tok)
    assert_same(t(ctx, seed=seed, epoch=0, index=0), t.reference(ctx, seed=seed, epoch=0, index=0))


def test_edges_inside_a_character(fim_tokenizer):  # noqa: F811
    """A context starting and ending inside a byte-fallback character keeps those bytes outside."""
    tok = fim_tokenizer
    ids = tok.encode("\U0001F701 def f(x):\n    return x  # 𝔘")  # two characters outside any vocabulary
    assert tok.token_bytes[ids[0]] == b"\xf0" and tok.token_bytes[ids[-1]] == b"\x98"
    ctx = np.asarray(ids[2:-1], dtype=np.int32)  # starts at the 3rd byte of U+1F701, ends before the last of 𝔘
    t = FimTransform(FimConfig(rate=1.0, spm_rate=0.0), tok)
    for index in range(20):
        fast = t(ctx, seed=3, epoch=0, index=index)
        assert_same(fast, t.reference(ctx, seed=3, epoch=0, index=index))
        out = fast.tokens.tolist()
        assert fast.modes == ["psm"]
        assert out[:2] == ids[2:4] and out[2] == tok.fim_prefix  # the orphan bytes stay in front
        whole = transform_piece(ctx.tolist(), piece_key(3, 0, index, 0), tok, 1.0, 0.0).tokens  # untruncated
        assert whole[:len(out)] == out
        mid = whole.index(tok.fim_middle)
        assert whole[mid - 3:mid] == ids[-4:-1]  # the partial 𝔘 stays right after the suffix


@pytest.mark.parametrize("level", ["context", "document"])
def test_small_and_special_pieces(fim_tokenizer, level):  # noqa: F811
    tok = fim_tokenizer
    cases = [[], [tok.eod], [tok.eod] * 3, tok.encode("x"), tok.encode("é") + [tok.eod] + tok.encode(" "),
             tok.encode("ab cd") + [tok.fim_pad] + tok.encode("ef"),  # a special token: left alone
             tok.encode("  ") + [tok.eod] + tok.encode("日"),
             # a lead byte, a whole character, then the lead's continuation bytes: not UTF-8
             [byte(tok, 0xE2)] + tok.encode("a") + [byte(tok, 0x80), byte(tok, 0x80)] + tok.encode(" b")]
    t = FimTransform(FimConfig(rate=1.0, level=level), tok)
    for ctx in cases:
        ctx = np.asarray(ctx, dtype=np.int32)
        for index in range(10):
            assert_same(t(ctx, seed=0, epoch=1, index=index), t.reference(ctx, seed=0, epoch=1, index=index))
    for case in (cases[5], cases[7]):  # a special token inside, invalid UTF-8: left as they are
        out = t(np.asarray(case, dtype=np.int32), seed=0, epoch=0, index=0)
        assert out.modes == ["ar"] and out.tokens.tolist() == case


def byte(tok, value: int) -> int:
    return tok.token_bytes.index(bytes([value]))


def test_rejects_ids_outside_the_vocabulary(fim_tokenizer):  # noqa: F811
    t = FimTransform(FimConfig(), fim_tokenizer)
    with pytest.raises(ValueError, match="position 1 is outside the vocabulary"):
        t(np.asarray([5, fim_tokenizer.vocab_size + 3]), seed=0, epoch=0, index=0)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_id_check_and_end_of_text_search_in_every_dtype(fim_tokenizer, dtype):  # noqa: F811
    """The first pass (ids checked against the vocabulary, end-of-texts found, in blocks of 64) at the
    vocabulary's edge and with end-of-texts on and around block boundaries."""
    tok = fim_tokenizer
    t = FimTransform(FimConfig(rate=0.9), tok)
    doc = tok.encode("def f(x):\n    return x + 1  # ok\n" * 20)
    ctx = np.asarray(doc[:300], dtype=dtype)
    for at in (0, 1, 62, 63, 64, 65, 127, 128, 191, 299):
        ctx[at] = tok.eod
    for index in range(8):
        fast = t(ctx, seed=1, epoch=0, index=index)
        assert_same(fast, t.reference(ctx.astype(np.int64), seed=1, epoch=0, index=index))
    last = ctx.copy()
    last[200] = tok.vocab_size - 1
    t(last, seed=1, epoch=0, index=0)  # the last id is in the vocabulary
    bad = [tok.vocab_size] + ([-1] if np.issubdtype(dtype, np.signedinteger) else [np.iinfo(dtype).max])
    for value in bad:
        wrong = ctx.copy()
        wrong[130] = value
        with pytest.raises(ValueError, match="position 130 is outside the vocabulary"):
            t(wrong, seed=1, epoch=0, index=0)
        with pytest.raises(ValueError, match="position 130 is outside the vocabulary"):
            t.sample(wrong, 1, 0, 0)


def test_cuts_anywhere_in_long_pieces(fim_tokenizer):  # noqa: F811
    """Pieces of hundreds of tokens (character counts are kept per block of 32 tokens), with and without
    byte-fallback tokens (the slow count): the cuts land in every block, at block edges too."""
    tok = fim_tokenizer
    t = FimTransform(FimConfig(rate=1.0, spm_rate=0.5), tok)
    for text in ("x = f(a, b)  # plain ascii\n" * 40, "s = '日本 😀 ∮ ᚠ 𝔘'  # π≈½\n" * 40):
        ids = tok.encode(text)
        for length in (31, 32, 33, 64, 65, 300):
            ctx = np.asarray(ids[:length] + [tok.eod] + ids[5:5 + length], dtype=np.uint16)
            for index in range(25):
                assert_same(t(ctx, seed=2, epoch=0, index=index), t.reference(ctx, seed=2, epoch=0, index=index))


def test_python_encoder_path_equals_native_path(fim_tokenizer, fim_tokenizer_sp):  # noqa: F811
    """Re-encoding through tokenizer.encode (any tokenizer) gives what the C++ encoder gives."""
    native = FimTransform(FimConfig(rate=0.9), fim_tokenizer)
    python = FimTransform(FimConfig(rate=0.9), fim_tokenizer_sp)
    assert native.native_encoder and not python.native_encoder
    text = "def f(x):\n    return x  # 日本 😀 ∮\n" * 30
    stream = np.asarray((fim_tokenizer.encode(text) + [fim_tokenizer.eod]) * 4, dtype=np.int32)
    for index in range(40):
        ctx = stream[index * 7:index * 7 + 257]
        assert_same(native(ctx, seed=5, epoch=2, index=index), python(ctx, seed=5, epoch=2, index=index))


def test_many_pieces_per_context_native_equals_python_encoder(fim_tokenizer, fim_tokenizer_sp):  # noqa: F811
    """Many short documents in one context: the C++ encoder encodes all their re-encoded words in one
    session (one workspace for the context, its word cache warm from the earlier words), and must give
    what encoding each word alone through tokenizer.encode gives."""
    native = FimTransform(FimConfig(rate=1.0, spm_rate=0.5), fim_tokenizer)
    python = FimTransform(FimConfig(rate=1.0, spm_rate=0.5), fim_tokenizer_sp)
    words = ["def", " f(x):", "\n    return", " x", "  # 日本", " 😀 ∮", " élan", "\t1234", " y_z"]
    rng = np.random.default_rng(0)
    for index in range(60):
        docs = ["".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(12)]
        stream = [t for d in docs for t in fim_tokenizer.encode(d) + [fim_tokenizer.eod]]
        ctx = np.asarray(stream[index % 5:], dtype=np.int32)
        fast = native(ctx, seed=3, epoch=0, index=index)
        assert fast.modes.count("ar") < len(fast.modes)
        assert_same(fast, python(ctx, seed=3, epoch=0, index=index))
        assert_same(fast, native.reference(ctx, seed=3, epoch=0, index=index))


@pytest.mark.parametrize("level", ["context", "document"])
def test_windows_of_real_code(fim_tokenizer, level):  # noqa: F811
    """Contexts that start and end at every token of real code: inside words whose remaining tokens are
    not what encoding the remaining text gives (the fast path must re-encode those edge words)."""
    import inspect
    import textwrap

    tok = fim_tokenizer
    docs = [inspect.getsource(textwrap), inspect.getsource(np.pad)]
    stream = [t for d in docs for t in tok.encode(d[:3000]) + [tok.eod]]
    t = FimTransform(FimConfig(rate=1.0, spm_rate=0.5, level=level), tok)
    non_canonical = 0
    for start in range(0, len(stream) - 60):
        ctx = np.asarray(stream[start:start + 60 + start % 50], dtype=np.int32)
        first = ctx[:12].tolist()
        text = b"".join(tok.token_bytes[i] for i in first).decode("utf-8", "ignore")
        non_canonical += tok.encode(text) != first
        assert_same(t(ctx, seed=9, epoch=0, index=start), t.reference(ctx, seed=9, epoch=0, index=start))
    assert non_canonical >= 5  # the case this test is for did occur
