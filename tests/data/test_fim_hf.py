"""FIM at load time with Hugging Face byte-level BPE tokenizers: the C++ fast path equals the slow
definition (fim_reference.py), cuts fall between characters, and the characters come back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megafim.data.fim import FimConfig, FimTransform, unpermute
from megafim.data.fim_reference import split_pieces
from megafim.data.tokenizer import load_tokenizer
from megafim.data.tokenizer_hf import BOUNDARY_NONE
from tests.data.hf_tokenizer_fixtures import gpt2_fim, hf_dir, hf_fim_tokenizer, llama3_fim, llama3_plain  # noqa: F401
from tests.data.test_fim_equality import assert_same, contexts
from tests.data.test_tokenizer_fixtures import stdlib_files

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**64 - 1), epoch=st.integers(0, 50), index=st.integers(0, 2**40),
       rate=st.sampled_from([0.5, 0.9, 1.0]), spm_rate=st.sampled_from([0.0, 0.5, 1.0]),
       level=st.sampled_from(["context", "document"]), mask_sentinels=st.booleans())
def test_fast_path_equals_definition(hf_fim_tokenizer, data, seed, epoch, index, rate, spm_rate, level,  # noqa: F811
                                     mask_sentinels):
    tok = hf_fim_tokenizer
    ctx = data.draw(contexts(tok))
    t = FimTransform(FimConfig(rate, spm_rate, level, mask_sentinels), tok)
    assert not t.native_encoder
    fast = t(ctx, seed=seed, epoch=epoch, index=index)
    assert len(fast.tokens) == len(ctx)
    assert_same(fast, t.reference(ctx, seed=seed, epoch=epoch, index=index))


# Whitespace runs with and without newlines, \r\n, \v and \f, line starts after newlines, digit runs,
# contractions, and non-ASCII pieces (Unicode whitespace among them) that the C++ encoder declines.
EDGE_PIECES = ["\n", "\n\n", "\r\n", "\r", " \n", "\n    ", "\n\t", "    ", " ", "\t", "\x0b", "\x0c", "x", "def",
               " return", "(a)", "):", "'s", "'LL", "123456", "#", "=", "\u00a0", "\u2028", "\u3000", "é", "日本", "😀"]


@SETTINGS
@given(docs=st.lists(st.lists(st.sampled_from(EDGE_PIECES), max_size=40).map("".join), min_size=1, max_size=4),
       cut=st.integers(0, 10**6), seed=st.integers(0, 2**64 - 1), level=st.sampled_from(["context", "document"]))
def test_line_starts_and_whitespace_runs(hf_fim_tokenizer, docs, cut, seed, level):  # noqa: F811
    """The texts the boundary rules and the C++ encoder decide on: equal to the definition, also when
    the context starts or ends inside a whitespace run (what follows it is then unknown)."""
    tok = hf_fim_tokenizer
    stream = []
    for d in docs:
        stream += tok.encode(d) + [tok.eod]
    ctx = np.asarray(stream[cut % len(stream):] + stream[:cut % len(stream)], dtype=np.int32)
    t = FimTransform(FimConfig(rate=1.0, spm_rate=0.5, level=level), tok)
    assert t.byte_bpe
    for index in range(3):
        assert_same(t(ctx, seed=seed, epoch=0, index=index), t.reference(ctx, seed=seed, epoch=0, index=index))


def pre_token_starts(tok, text: str) -> set[int]:
    """Byte offsets where the library's pre-tokenizer starts a piece of ``text``."""
    pieces = tok._hf.pre_tokenizer.pre_tokenize_str(text)
    return {len(text[:start].encode()) for _, (start, _) in pieces}


@SETTINGS
@given(text=st.lists(st.sampled_from(EDGE_PIECES), max_size=60).map("".join), cut=st.integers(0, 10**6))
def test_boundaries_are_pre_token_boundaries(hf_fim_tokenizer, text, cut):  # noqa: F811
    """Every place the tokenizer's boundary rule trusts is where its pre-tokenizer starts a piece, in
    the whole text and in what is left of it when a context starts or ends inside it."""
    tok = hf_fim_tokenizer
    native = FimTransform(FimConfig(rate=1.0), tok)._native
    ids = tok.encode(text)
    k = cut % (len(ids) + 1)
    for part in (ids, ids[:k], ids[k:]):
        data = b"".join(tok.token_bytes[i] for i in part)
        try:
            part_text = data.decode("utf-8")
        except UnicodeDecodeError:  # cut inside a character: such a core does not take part in FIM
            continue
        ends = np.cumsum([len(tok.token_bytes[i]) for i in part]).tolist()
        starts = pre_token_starts(tok, part_text)
        assert all(ends[j - 1] in starts for j in native.boundaries(part)), (part_text, native.boundaries(part))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=60), seed=st.integers(0, 2**64 - 1),
       spm_rate=st.sampled_from([0.0, 1.0]))
def test_any_text_round_trips(hf_fim_tokenizer, text, seed, spm_rate):  # noqa: F811
    """Whole documents of arbitrary code points, always FIM: equal to the definition, and the
    characters come back exactly (no cut inside a character, nothing lost)."""
    tok = hf_fim_tokenizer
    docs = [text, text[::-1], "x = 1  # " + text]
    ctx = []
    for d in docs:
        ctx += tok.encode(d) + [tok.eod]
    ctx = np.asarray(ctx + tok.encode("tail = 1\n" * 100), dtype=np.int32)  # what the length cuts off
    t = FimTransform(FimConfig(rate=1.0, spm_rate=spm_rate), tok)
    fast = t(ctx, seed=seed, epoch=0, index=0)
    assert_same(fast, t.reference(ctx, seed=seed, epoch=0, index=0))
    assert unpermute(fast.tokens, tok)[:3] == [d.encode() for d in docs]


def test_decode_of_samples_gives_the_documents_back(hf_fim_tokenizer):  # noqa: F811
    """Real source: every whole piece of every FIM sample decodes to its document's characters."""
    tok = hf_fim_tokenizer
    docs = [p.read_text(encoding="utf-8")[:3000] for p in stdlib_files(limit=12, step=41)]
    docs += ["日本語のテキスト 😀 naïve café\n\tx = 'π≈3.14'\n"] * 3
    stream = []
    for d in docs:
        stream += tok.encode(d) + [tok.eod]
    ctx = np.asarray(stream, dtype=np.int32)
    t = FimTransform(FimConfig(rate=0.9, spm_rate=0.5), tok)
    fim_pieces = 0
    for index in range(30):
        out = t(ctx, seed=5, epoch=0, index=index)
        assert_same(out, t.reference(ctx, seed=5, epoch=0, index=index))
        pieces = unpermute(out.tokens, tok)
        whole = len(pieces) - 1  # the last one may be cut off by the context's length
        assert [p.decode("utf-8") for p in pieces[:whole]] == docs[:whole]
        fim_pieces += sum(m != "ar" for m in out.modes[:whole])
        # no cut inside a character: everything up to the piece the length cut off is valid UTF-8
        last_eod = len(out.tokens) - 1 - out.tokens[::-1].tolist().index(tok.eod)
        assert "\ufffd" not in tok.decode(out.tokens[:last_eod])
    assert fim_pieces > 100


def test_unknown_pre_tokenizer_re_encodes_whole_parts(hf_dir, gpt2_fim):  # noqa: F811
    """With a pre-tokenizer megafim does not know, no token boundary is trusted; still exact."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    r = RustTokenizer.from_file(str(gpt2_fim))
    r.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|[^\w]+"), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    path = hf_dir / "fim_unknown_regex.json"
    r.save(str(path))
    tok = load_tokenizer(path)
    assert tok.fim_boundaries == BOUNDARY_NONE
    text = "def f(x):\n    return x  # a b  c\n\n  y = [1, 2]  日本 \n"
    ctx = np.asarray([tok.eod] + tok.encode(text * 4) + [tok.eod] + tok.encode(text)[:-2], dtype=np.int32)
    t = FimTransform(FimConfig(rate=1.0), tok)
    for index in range(40):
        assert_same(t(ctx, seed=1, epoch=0, index=index), t.reference(ctx, seed=1, epoch=0, index=index))


def test_refused_without_fim_tokens(llama3_plain):  # noqa: F811
    tok = load_tokenizer(llama3_plain)
    with pytest.raises(ValueError, match="no fim_prefix, fim_middle, fim_suffix, fim_pad token.*add_fim_tokens"):
        FimTransform(FimConfig(rate=0.5), tok)


def test_inspect_samples_with_a_tokenizer_directory(tmp_path, llama3_fim):  # noqa: F811
    """tools/inspect_samples.py on data written with a Hugging Face tokenizer: the samples are the
    dataset's, the sentinels are written by name, and every whole piece decodes to its document."""
    import io
    import json

    from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec
    from megafim.data.indexed import IndexedDatasetBuilder
    from tests.data.test_fim_inspect import DOCS, load_tool

    tok = load_tokenizer(llama3_fim)
    prefix = str(tmp_path / "tiny")
    with IndexedDatasetBuilder(prefix) as b:
        for d in DOCS:
            b.add_document(np.asarray(tok.encode(d) + [tok.eod]))
    out = io.StringIO()
    assert load_tool().main(["--data-path", prefix, "--tokenizer-model", str(llama3_fim), "--tokenizer-type",
                             "HuggingFaceTokenizer", "--seq-length", "64", "--fim-rate", "1.0", "--seed", "3",
                             "--num-samples", "4", "--json"], stream=out) == 0
    ds = GPTDataset(GPTDatasetSpec(path_prefix=prefix, seq_length=64, seed=3),
                    fim=FimTransform(FimConfig(rate=1.0), tok))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    for line in lines:
        obj = json.loads(line)
        train = ds[obj["index"]]  # the very sample the trainer gets
        assert train["tokens"].tolist() == obj["tokens"][:-1] and train["labels"].tolist() == obj["tokens"][1:]
        assert "<|fim_prefix|>" in obj["text"]
        original = [b"".join(tok.token_bytes[t] for t in p)
                    for p in split_pieces(ds.context(obj["index"]).tolist(), tok.eod)]
        restored = unpermute(obj["tokens"], tok)
        assert restored[:-1] == original[:len(restored) - 1]
