"""megafim's C++ byte-level BPE encoder (csrc/byte_bpe.h) gives the `tokenizers` library's ids, id for
id, on ASCII text built to hit every alternative of the Llama 3 / Qwen2 / GPT-2 pre-tokenizer regexes;
it declines other text, and tokenizers it cannot reproduce get no spec."""

from __future__ import annotations

import json

import numpy as np

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megafim._native import load
from megafim.data.byte_bpe import QWEN2_REGEX, STEP_DIGITS_RUNS, STEP_GPT2, STEP_LLAMA3, STEP_QWEN2, byte_bpe_spec
from megafim.data.tokenizer import load_tokenizer
from megafim.data.tokenizer_hf import unicode_to_byte
from tests.data.hf_tokenizer_fixtures import gpt2_fim, hf_dir, llama3_fim, llama3_plain  # noqa: F401
from tests.data.test_tokenizer_fixtures import stdlib_files

# Pieces that meet the regexes' quirks: contractions in both cases and cut short, digit runs longer
# than 3, whitespace runs ending in a newline or before a word, \r\n, \v \f, control bytes (not \s
# for the library: \x1c-\x1f, unlike Python's str.isspace), punctuation runs before newlines.
PIECES = list("aZq09_=():;.,#'\"!?<>|\\/-+*&%$@`~[]{}^") + [
    "'s", "'S", "'t", "'re", "'RE", "'Ve", "'m", "'ll", "'LL", "'d", "'D", "'", "''", "'x",
    "1234567", "12", " 5", "x1", " ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ",
    "\n    ", " \t\n ", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f", "\x01", "def", " return", "self",
    "):\n", "==\n\n", "#!", "<|endoftext|>", "<fim_prefix>", "don't", "I'M", "you'Re",
]
ascii_texts = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def with_pre_tokenizer(path, hf_dir, name, pre_tokenizer):  # noqa: F811
    from tokenizers import Tokenizer as RustTokenizer

    r = RustTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    r.pre_tokenizer = pre_tokenizer
    out = hf_dir / f"{name}.json"
    r.save(str(out))
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def tokenizers(llama3_fim, gpt2_fim, hf_dir):  # noqa: F811
    """Llama 3 (ignore_merges), GPT-2 + single digits; Qwen2's regex and digit runs on the Llama 3
    merges; each with its encoder."""
    from tokenizers import Regex, pre_tokenizers

    qwen2 = with_pre_tokenizer(llama3_fim, hf_dir, "qwen2_style", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    runs = with_pre_tokenizer(gpt2_fim, hf_dir, "digit_runs", pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]))
    toks = [load_tokenizer(llama3_fim), load_tokenizer(gpt2_fim), qwen2, runs]
    native = load("byte_bpe")
    return [(t, native.ByteBpe(t.byte_bpe_spec())) for t in toks]


def test_specs(tokenizers):
    steps = [t.byte_bpe_spec()[2] for t, _ in tokenizers]
    assert steps == [[STEP_LLAMA3], [3, STEP_GPT2], [STEP_QWEN2], [STEP_DIGITS_RUNS, STEP_GPT2]]
    assert [t.byte_bpe_spec()[3] for t, _ in tokenizers] == [True, False, True, False]


@SETTINGS
@given(text=ascii_texts)
def test_same_ids_as_the_library(tokenizers, text):
    for tok, enc in tokenizers:
        assert enc.encode(text) == tok.encode(text), (tok, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(max_codepoint=127), max_size=80))
def test_any_ascii(tokenizers, text):
    for tok, enc in tokenizers:
        assert enc.encode(text) == tok.encode(text), (tok, text)


def test_source_files(tokenizers):
    """Whole ASCII source files, long words and whitespace runs included (the word cache is warm on
    the second pass and must give the same ids)."""
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files(limit=30, step=23)]
    texts = [t for t in texts if t.isascii()] + ["=" * 300 + " " * 200 + "\n" * 70 + "x" * 100]
    assert len(texts) > 15
    for _ in range(2):
        for tok, enc in tokenizers:
            assert [enc.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_declines_what_it_does_not_take(tokenizers, llama3_fim, hf_dir):  # noqa: F811
    tok, enc = tokenizers[0]
    assert enc.encode("naïve") is None and enc.encode("x = '日本'") is None
    assert enc.encode("") == []
    # A non-special added token is split out of text by the library: such texts are declined.
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    r = RustTokenizer.from_file(str(llama3_fim / "tokenizer.json"))
    r.add_tokens([AddedToken("<tool_call>", special=False)])
    r.save(str(hf_dir / "added_plain.json"))
    added = load_tokenizer(hf_dir / "added_plain.json")
    enc2 = load("byte_bpe").ByteBpe(added.byte_bpe_spec())
    assert enc2.encode("a <tool_call> b") is None
    assert enc2.encode("a <tool b") == added.encode("a <tool b")


@pytest.mark.parametrize("change", [
    lambda s: s.update(normalizer={"type": "Lowercase"}),
    lambda s: s["model"].update(dropout=0.1),
    lambda s: s["model"].update(continuing_subword_prefix="##"),
    lambda s: s.update(pre_tokenizer={"type": "Whitespace"}),
    lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+|[^\w]+"),
    lambda s: s["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"),
    lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
    lambda s: s.update(truncation={"max_length": 4}),
    lambda s: s["model"].update(vocab={k: v for k, v in s["model"]["vocab"].items() if k != "A"}),
])
def test_no_spec_for_what_it_cannot_reproduce(llama3_fim, change):  # noqa: F811
    spec = json.loads((llama3_fim / "tokenizer.json").read_text(encoding="utf-8"))
    assert byte_bpe_spec(spec, unicode_to_byte()) is not None
    change(spec)
    assert byte_bpe_spec(spec, unicode_to_byte()) is None


def test_bad_spec_is_refused():
    native = load("byte_bpe")
    vocab = [bytes([b]) for b in range(256)]
    with pytest.raises(ValueError, match="lacks the byte 65"):
        native.ByteBpe(([b for b in vocab if b != b"A"], np.zeros((0, 3), np.int32), [1], False, []))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        native.ByteBpe((vocab, np.zeros((2, 2), np.int32), [1], False, []))
    with pytest.raises(ValueError, match="unknown pre-tokenizer step"):
        native.ByteBpe((vocab, np.zeros((0, 3), np.int32), [9], False, []))


def test_batch_encoders_mix_both_encoders(tokenizers, llama3_fim, hf_dir):  # noqa: F811
    """encode_flat / encode_batch (preprocessing): ASCII texts from C++, the others from the library,
    in order; with a non-special added token the texts holding it go to the library."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    r = RustTokenizer.from_file(str(llama3_fim / "tokenizer.json"))
    r.add_tokens([AddedToken("<tool_call>", special=False)])
    r.save(str(hf_dir / "added_plain_batch.json"))
    texts = ["def f(x):\n    return x\n", "naïve 日本", "", "a <tool_call> b", "<|fim_prefix|> x", "1234567 'S"]
    for tok in [t for t, _ in tokenizers] + [load_tokenizer(hf_dir / "added_plain_batch.json")]:
        expected = [tok._hf.encode(t, add_special_tokens=False).ids for t in texts]
        flat, lengths = tok.encode_flat(texts)
        assert lengths.tolist() == [len(e) for e in expected] and flat.tolist() == sum(expected, [])
        assert flat.dtype == np.int32 and lengths.dtype == np.int64
        assert [b.tolist() for b in tok.encode_batch(texts)] == expected
        assert tok.encode_batch([]) == [] and tok.encode_flat([])[0].size == 0


def known_tokens(tok, text: str, start: int, end: int) -> list[tuple[int, int]]:
    """(offset in text[start:end], id) of the tokens of tok.encode(text) that lie wholly in [start, end)."""
    out, pos = [], 0
    for i in tok.encode(text):
        n = len(tok.token_bytes[i])
        if start <= pos and pos + n <= end and n:
            out.append((pos - start, i))
        pos += n
    return out


@SETTINGS
@given(text=ascii_texts, cuts=st.tuples(st.integers(0, 400), st.integers(0, 400)))
def test_known_tokens_give_the_same_ids(tokenizers, text, cuts):
    """FIM re-encodes a text cut out of tokens it has and passes the tokens it holds whole as `known`
    (ignore_merges: a pre-token that is one of them is that token, no lookup). Any cut of any text:
    the library's ids of the cut text."""
    a, b = sorted(min(c, len(text)) for c in cuts)
    for tok, enc in tokenizers:
        known = known_tokens(tok, text, a, b)
        assert enc.encode(text[a:b], known) == tok.encode(text[a:b]), (tok, text, a, b, known)


def test_known_tokens_on_source_files(tokenizers):
    """Cuts of source files at many places, with the tokens each cut holds whole as `known`."""
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files(limit=12, step=37)]
    texts = [t for t in texts if t.isascii()]
    assert len(texts) > 5
    rng = np.random.default_rng(0)
    for tok, enc in tokenizers[:1]:  # Llama 3 style: the one with ignore_merges and its own merges
        for text in texts:
            text = text[:3000]
            for a, n in zip(rng.integers(0, len(text), 40), rng.integers(1, 60, 40)):
                b = min(len(text), int(a + n))
                assert enc.encode(text[a:b], known_tokens(tok, text, a, b)) == tok.encode(text[a:b])
