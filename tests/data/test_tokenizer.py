"""The Tokenizer interface: special ids, lossless round trips, token_bytes, decode, bad model files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megafim.data.tokenizer import REPO_PIECES, SPECIAL_PIECES, Tokenizer
from tests.data.test_tokenizer_fixtures import (  # noqa: F401  (session fixtures)
    small_model, small_tokenizer, sp_tokenizer, stdlib_files, train_tool)

HARD_TEXTS = [
    "", " ", "  ", "\n", "\t", "\x00", "\x00\x00a", "a\x00 b", "\r\n", "def f():\n    return 1\n",
    "    \n\t\t  x", "\u0301", "e\u0301\u0301", "😀", "👩‍👩‍👧", "中文 日本語", "▁", "▁▁", " ▁ ", "a▁b", "x ▁",
    "\u2581\u2581 \u2581", "<fim_prefix>", "<|endoftext|>", "<unk>", "<0x41>", "\ufffd", "\U0010ffff",
    "a" * 5000, " " * 300 + "x", "1234567890", "x = 3.14159e-10\n",
]


@pytest.fixture(params=["auto", "sentencepiece"], scope="module")
def tok(request, small_model):
    return Tokenizer.from_file(small_model, backend=request.param)


def test_special_ids_are_distinct_control_ids(tok, small_model):
    ids = [tok.eod, tok.fim_prefix, tok.fim_middle, tok.fim_suffix, tok.fim_pad, tok.repo_name, tok.file_sep]
    assert len(set(ids)) == 7 and all(0 <= i < tok.vocab_size for i in ids)
    sp = spm.SentencePieceProcessor(model_file=small_model)
    for attr, piece in {**SPECIAL_PIECES, **REPO_PIECES}.items():
        assert sp.id_to_piece(getattr(tok, attr)) == piece and sp.is_control(getattr(tok, attr))
    assert sp.bos_id() == -1 and sp.eos_id() == tok.eod
    info = json.loads(open(small_model[:-len(".model")] + ".json").read())
    assert info["special_ids"] == {k: getattr(tok, k) for k in {**SPECIAL_PIECES, **REPO_PIECES}}
    assert info["vocab_size"] == tok.vocab_size == 2000


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_round_trip_hard_cases(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes[i] for i in ids) == text.encode("utf-8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_round_trip_any_text(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list(" \t\n▁<>|_abcdefimoprstuxz"))))
def test_encode_never_gives_special_ids(small_tokenizer, text):
    # Text spelling out the special tokens' names must encode as ordinary pieces.
    text = text + "<fim_prefix><fim_middle><fim_suffix><fim_pad><|endoftext|><unk>"
    special = {small_tokenizer.eod, small_tokenizer.fim_prefix, small_tokenizer.fim_middle,
               small_tokenizer.fim_suffix, small_tokenizer.fim_pad, 0}
    assert not special & set(small_tokenizer.encode(text))


def test_literal_space_symbol_is_byte_encoded(tok):
    ids = tok.encode("a\u2581b")
    byte_ids = [tok.token_bytes.index(bytes([b])) for b in "\u2581".encode()]
    assert ids == tok.encode("a") + byte_ids + tok.encode("b")


def test_token_bytes(tok, small_model):
    sp = spm.SentencePieceProcessor(model_file=small_model)
    assert len(tok.token_bytes) == tok.vocab_size
    for i in range(tok.vocab_size):
        if sp.is_control(i) or sp.is_unknown(i):
            assert tok.token_bytes[i] == b""
        elif sp.is_byte(i):
            assert tok.token_bytes[i] == bytes([int(sp.id_to_piece(i)[3:5], 16)])
        else:
            assert tok.token_bytes[i] == sp.id_to_piece(i).replace("\u2581", " ").encode()
            assert tok.token_bytes[i]


def test_decode_renders_special_tokens_by_name(tok):
    ids = [tok.fim_prefix] + tok.encode("x = 1") + [tok.fim_suffix, tok.fim_middle, tok.eod, tok.fim_pad]
    assert tok.decode(ids) == "<fim_prefix>x = 1<fim_suffix><fim_middle><|endoftext|><fim_pad>"
    assert tok.decode(np.array(ids, dtype=np.int32)) == tok.decode(ids)


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    for bad in (-1, tok.vocab_size):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([5, bad])


def test_encode_batch_matches_encode(tok):
    texts = HARD_TEXTS + [p.read_text(encoding="utf-8") for p in stdlib_files(limit=20, step=50)]
    for threads in (0, 1, 2):
        out = tok.encode_batch(texts, num_threads=threads)
        assert len(out) == len(texts)
        for text, arr in zip(texts, out):
            assert isinstance(arr, np.ndarray) and arr.dtype == np.int32
            assert arr.tolist() == tok.encode(text)


def test_missing_model_file_is_named(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_file(missing)


def test_garbage_model_file_is_named(tmp_path):
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"this is not a model\xff\x00" * 10)
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer.from_file(bad)


def test_model_without_special_tokens_names_them(tmp_path, small_model):
    text = "\n".join(p.read_text(encoding="utf-8") for p in stdlib_files(limit=10, step=40))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n\n")), model_prefix=str(tmp_path / "plain"), vocab_size=400,
        model_type="bpe", byte_fallback=True, control_symbols=["<fim_prefix>"], minloglevel=2)
    with pytest.raises(ValueError) as err:
        Tokenizer.from_file(tmp_path / "plain.model")
    message = str(err.value)
    assert "plain.model" in message
    for piece in ("<|endoftext|>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"):
        assert piece in message
    assert "<fim_prefix>," not in message


def test_from_file_accepts_the_output_prefix(small_model):
    assert Tokenizer.from_file(small_model[:-len(".model")]).vocab_size == 2000


def test_pickles_with_its_model(tok, tmp_path):
    import pickle
    import shutil

    moved = tmp_path / "moved.model"
    shutil.copy(tok.model_path, moved)
    original = Tokenizer.from_file(moved)
    moved.unlink()  # the copy carries the model itself, not just its path
    copy = pickle.loads(pickle.dumps(original))
    assert copy.backend == original.backend and copy.vocab_size == original.vocab_size
    text = "def f(x):\n    return x ▁ 1\n"
    assert copy.encode(text) == original.encode(text) and copy.decode(copy.encode(text)) == text
