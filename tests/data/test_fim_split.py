"""FIM per file (``FimConfig.split_token``, ``--fim-split-token``): repository-level documents
``<repo_name>NAME<file_sep>PATH\\nCONTENT<file_sep>...`` are FIM'd file by file. The C++ fast path
equals the slow definition (fim_reference.py) with both tokenizer backends; split tokens and
end-of-texts stay where they were; every file comes back whole; bad split tokens are refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megafim.data.fim import FimConfig, FimTransform, split_token_id, unpermute
from megafim.data.fim_reference import split_pieces
from megafim.data.gpt_dataset import document_segments
from tests.data.split_tokenizer_fixtures import (gpt2_fim, hf_dir, hf_split_tokenizer, small_model,  # noqa: F401
                                                 split_model, split_tokenizer, split_tokenizer_sp, train_tool)
from tests.data.test_fim_equality import assert_same, raw_bytes, texts

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PATHS = ["a.py", "src/x.py", "README.md", "日本/é.txt", ""]


def repo_document(tok, name: str, files: list[tuple[str, str]]) -> list[int]:
    """StarCoder2's repository layout, as tools/preprocess_data.py writes it: specials by id."""
    rn, fs = tok.token_id("<repo_name>"), tok.token_id("<file_sep>")
    ids = [rn] + tok.encode(name)
    for path, content in files:
        ids += [fs] + tok.encode(f"{path}\n{content}")
    return ids


@st.composite
def repo_contexts(draw, tok):
    """A window of a packed stream of repository documents (and plain ones): it may start and end
    inside a file, a word or a character, hold empty files, and sometimes a stray raw byte."""
    stream: list[int] = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)) == 0:
            ids = tok.encode(draw(texts))  # a plain document
        else:
            files = draw(st.lists(st.tuples(st.sampled_from(PATHS), texts), max_size=5))
            ids = repo_document(tok, draw(st.sampled_from(["r", "org/proj"])), files)
        if draw(st.integers(0, 7)) == 0:
            at = draw(st.integers(0, len(ids)))
            ids[at:at] = [draw(st.sampled_from(raw_bytes(tok)))]
        stream += ids + [tok.eod]
    start = draw(st.integers(0, len(stream) - 1))
    length = draw(st.integers(0, len(stream) - start))
    return np.asarray(stream[start:start + length], dtype=np.int32)


def check_equal(tok, ctx, seed, index, rate, spm_rate, level, mask_sentinels):
    t = FimTransform(FimConfig(rate, spm_rate, level, mask_sentinels, split_token="<file_sep>"), tok)
    fast = t(ctx, seed=seed, epoch=1, index=index)
    assert len(fast.tokens) == len(ctx)
    assert_same(fast, t.reference(ctx, seed=seed, epoch=1, index=index))
    tokens, loss, middle = t.sample(ctx.astype(np.int64), seed, 1, index)
    np.testing.assert_array_equal(tokens, fast.tokens)
    np.testing.assert_array_equal(loss, fast.loss_mask)
    n_files = sum(len(split_pieces(p, t.split_id)) for p in split_pieces(ctx.tolist(), tok.eod))
    assert len(fast.modes) == n_files


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**64 - 1), index=st.integers(0, 2**40),
       rate=st.sampled_from([0.0, 0.5, 1.0]), spm_rate=st.sampled_from([0.0, 0.5, 1.0]),
       level=st.sampled_from(["context", "document"]), mask_sentinels=st.booleans())
def test_fast_path_equals_definition_native(split_tokenizer, data, seed, index, rate, spm_rate, level,  # noqa: F811
                                            mask_sentinels):
    ctx = data.draw(repo_contexts(split_tokenizer))
    check_equal(split_tokenizer, ctx, seed, index, rate, spm_rate, level, mask_sentinels)


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**64 - 1), index=st.integers(0, 2**40),
       spm_rate=st.sampled_from([0.0, 0.5, 1.0]), level=st.sampled_from(["context", "document"]))
def test_fast_path_equals_definition_python_encoder(split_tokenizer_sp, data, seed, index, spm_rate,  # noqa: F811
                                                    level):
    ctx = data.draw(repo_contexts(split_tokenizer_sp))
    check_equal(split_tokenizer_sp, ctx, seed, index, 0.9, spm_rate, level, False)


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**64 - 1), index=st.integers(0, 2**40),
       spm_rate=st.sampled_from([0.0, 0.5, 1.0]), level=st.sampled_from(["context", "document"]),
       mask_sentinels=st.booleans())
def test_fast_path_equals_definition_hf(hf_split_tokenizer, data, seed, index, spm_rate, level,  # noqa: F811
                                        mask_sentinels):
    ctx = data.draw(repo_contexts(hf_split_tokenizer))
    check_equal(hf_split_tokenizer, ctx, seed, index, 0.9, spm_rate, level, mask_sentinels)


FILES = [("a.py", "def add(a, b):\n    return a + b\n"), ("b/c.py", "import os\n\nprint(os.getcwd())  # 日本\n"),
         ("README.md", "# naïve café 😀\n"), ("empty.py", ""), ("d.py", "class A:\n    pass\n")]


def test_documents_without_the_split_token_are_unchanged(split_tokenizer):  # noqa: F811
    """A context of plain documents is transformed exactly as without the option (the first file of
    a piece keeps the piece's RNG key)."""
    tok = split_tokenizer
    docs = [tok.encode(c) for _, c in FILES]
    ctx = np.asarray([t for d in docs for t in d + [tok.eod]], dtype=np.int32)
    for level in ("context", "document"):
        plain = FimTransform(FimConfig(rate=0.7, level=level), tok)
        split = FimTransform(FimConfig(rate=0.7, level=level, split_token="<file_sep>"), tok)
        for index in range(30):
            assert_same(split(ctx, seed=4, epoch=0, index=index), plain(ctx, seed=4, epoch=0, index=index))


@pytest.mark.parametrize("which", ["sentencepiece", "hf"])
def test_each_file_comes_back_and_separators_stay(split_tokenizer, hf_split_tokenizer, which):  # noqa: F811
    """Always FIM: every file (not the whole document) is one FIM example; unpermuting each file gives
    its bytes; at document level every end-of-text and split token keeps its position."""
    tok = split_tokenizer if which == "sentencepiece" else hf_split_tokenizer
    doc = repo_document(tok, "org/proj", FILES)
    ctx = np.asarray(doc + [tok.eod] + doc + [tok.eod] + [tok.fim_pad] * 200, dtype=np.int32)
    fs = tok.token_id("<file_sep>")
    originals = [b"".join(tok.token_bytes[t] for t in f) for f in split_pieces(doc, fs)]
    for level in ("context", "document"):
        t = FimTransform(FimConfig(rate=1.0, spm_rate=0.5, level=level, split_token="<file_sep>"), tok)
        seen_modes = set()
        for index in range(20):
            out = t(ctx, seed=11, epoch=0, index=index)
            got = out.tokens.tolist()
            # <repo_name>NAME holds a byte-less special token: left alone; every file (path + text) is FIM'd.
            assert out.modes[0] == out.modes[6] == "ar"  # the repository names
            if level == "context":  # (at document level a file too short to absorb the sentinels stays)
                assert all(m != "ar" for m in out.modes[1:6] + out.modes[7:12])
            seen_modes.update(out.modes)
            pieces = split_pieces(got, tok.eod)
            for p in pieces[:2]:
                files = split_pieces(p, fs)
                assert len(files) == len(FILES) + 1
                for f in files:  # one FIM example per file: its sentinels never cross a split token
                    assert f.count(tok.fim_prefix) == f.count(tok.fim_middle) == f.count(tok.fim_suffix) <= 1
            if level == "context":  # (document level trims suffixes to keep each file's length)
                assert unpermute(out.tokens, tok, fs)[:2 * len(originals)] == originals * 2
            else:
                where = lambda ts: [i for i, x in enumerate(ts) if x in (fs, tok.eod)]  # noqa: E731
                assert where(got) == where(ctx.tolist())
        assert {"psm", "spm"} <= seen_modes


def test_files_decide_independently(split_tokenizer):  # noqa: F811
    """At rate 0.5 the files of one document do not share one decision (bigcode's per-file FIM), and
    the sample index, not the file's position alone, drives it."""
    tok = split_tokenizer
    doc = repo_document(tok, "r", [f for f in FILES if f[1]] * 3)
    ctx = np.asarray(doc + [tok.eod], dtype=np.int32)
    t = FimTransform(FimConfig(rate=0.5, spm_rate=0.5, split_token="<file_sep>"), tok)
    rows = [t(ctx, seed=1, epoch=0, index=i).modes[1:] for i in range(40)]
    mixed = sum(1 for r in rows if "ar" in r and set(r) - {"ar"})
    assert mixed >= 30
    fim_share = np.mean([m != "ar" for r in rows for m in r])
    assert 0.4 < fim_share < 0.6


def test_reset_attention_mask_keeps_each_file_in_its_document(split_tokenizer):  # noqa: F811
    """With --reset-attention-mask the segments are the end-of-text-separated documents after FIM:
    every token of a FIM'd file (sentinels included) is in its repository's segment."""
    tok = split_tokenizer
    docs = [repo_document(tok, f"r{k}", FILES[k:] + FILES[:k]) for k in range(3)]
    ctx = np.asarray([t for d in docs for t in d + [tok.eod]] + [tok.fim_pad] * 100, dtype=np.int32)
    t = FimTransform(FimConfig(rate=1.0, split_token="<file_sep>"), tok)
    out = t(ctx, seed=0, epoch=0, index=3)
    inputs, _ = document_segments(out.tokens, tok.eod)
    rn = tok.token_id("<repo_name>")
    tokens = out.tokens[:-1].tolist()
    starts = [i for i, x in enumerate(tokens) if x == rn]
    assert len(starts) == 3
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(tokens)
        seg = inputs[s:end].tolist()
        # the repository's tokens, up to its end-of-text, are one segment (the eod opens the next one)
        eod_at = tokens.index(tok.eod, s)
        assert set(seg[:eod_at - s + 1]) == {k}
        assert tokens[s:eod_at].count(tok.fim_prefix) == len(FILES)  # every file FIM'd, inside the segment


@pytest.mark.parametrize("name, message", [
    ("<nope>", "FimConfig.split_token '<nope>': tokenizer"),
    ("<|endoftext|>", "is the tokenizer's eod token"),
    ("<fim_middle>", "is the tokenizer's fim_middle token"),
])
def test_bad_split_tokens_are_refused(split_tokenizer, name, message):  # noqa: F811
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        FimTransform(FimConfig(rate=0.5, split_token=name), split_tokenizer)
    with pytest.raises(ValueError, match="FimConfig.split_token"):
        FimConfig(split_token="")
    assert split_token_id(FimConfig(), split_tokenizer) is None


def test_hf_bad_split_token(hf_split_tokenizer):  # noqa: F811
    with pytest.raises(ValueError, match="no such token"):
        split_token_id(FimConfig(split_token="<file-sep>"), hf_split_tokenizer)
    assert split_token_id(FimConfig(split_token="<file_sep>"), hf_split_tokenizer) == \
        hf_split_tokenizer.token_id("<file_sep>")


def test_inspect_samples_shows_files(split_tokenizer, split_model, tmp_path, capsys):  # noqa: F811
    """tools/inspect_samples.py --fim-split-token: one mode per file, what training reads; a token
    the tokenizer lacks is exit code 2 with one line naming the flag."""
    from megafim.data.indexed import IndexedDatasetBuilder
    from tests.data.test_fim_inspect import load_tool

    tok = split_tokenizer
    prefix = str(tmp_path / "repos")
    with IndexedDatasetBuilder(prefix) as b:
        for k in range(6):
            b.add_document(np.asarray(repo_document(tok, f"r{k}", FILES[k % 5:] + FILES[:k % 5]) + [tok.eod]))
    tool = load_tool()
    args = ["--data-path", prefix, "--tokenizer-model", split_model, "--seq-length", "96", "--fim-rate", "1",
            "--num-samples", "3"]
    import io
    import json

    out = io.StringIO()
    assert tool.main(args + ["--json", "--fim-split-token", "<file_sep>"], stream=out) == 0
    t = FimTransform(FimConfig(rate=1.0, split_token="<file_sep>"), tok)
    for line in out.getvalue().splitlines():
        obj = json.loads(line)
        ctx = np.asarray(obj["tokens"])
        n_files = sum(len(split_pieces(p, t.split_id)) for p in split_pieces(ctx.tolist(), tok.eod))
        assert len(obj["modes"]) >= n_files - 1 and {"psm", "spm"} & set(obj["modes"])
    text = io.StringIO()
    assert tool.main(args + ["--fim-split-token", "<file_sep>"], stream=text) == 0
    assert "=== sample 0 (epoch 0): files ar, " in text.getvalue()
    assert tool.main(args + ["--fim-split-token", "<nope>"], stream=io.StringIO()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("inspect_samples: error: --fim-split-token: FimConfig.split_token")


def test_split_id_beyond_uint16_with_uint16_contexts():
    """A vocabulary above 65535 with a context stored as uint16 (ids below 65536 only): the split id
    matches no token. It must not be truncated to 16 bits (id 65536 + 7 is not token 7)."""
    from megafim._native import load as load_native

    token_bytes = [b""] * 8 + [bytes([c]) for c in range(32, 127)]
    token_bytes += [b""] * (65536 + 16 - len(token_bytes))
    char_id = {chr(c): 8 + c - 32 for c in range(32, 127)}
    fim = load_native("fim").Fim.with_callable(token_bytes, eod=0, fim_prefix=1, fim_middle=2, fim_suffix=3,
                                               fim_pad=4, encode=lambda s: [char_id[c] for c in s], boundaries=0)
    text = [char_id[c] for c in "def f(x): return x"]
    ctx = text[:5] + [7] + text[5:] + [0] + text  # token 7: 65536 + 7 truncated to 16 bits
    for index in range(8):
        wide = fim.transform(np.asarray(ctx, np.int64), 3, 0, index, 1.0, 0.5, False, False, split_token=65536 + 7)
        narrow = fim.transform(np.asarray(ctx, np.uint16), 3, 0, index, 1.0, 0.5, False, False,
                               split_token=65536 + 7)
        assert len(wide[3]) == len(narrow[3]) == 2  # one file per piece
        for a, b in zip(wide, narrow):
            np.testing.assert_array_equal(np.asarray(a if not isinstance(a, bytes) else list(a)),
                                          np.asarray(b if not isinstance(b, bytes) else list(b)))
