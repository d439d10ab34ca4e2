"""The C++ encoder (csrc/bpe.h) against sentencepiece itself: the same ids on any text.

Sentencepiece's ids are the reference everywhere except for a literal U+2581, which megafim encodes
as bytes (``Tokenizer.encode_reference`` defines that case on top of sentencepiece).
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megafim.data.tokenizer import UNUSED, Tokenizer
from tests.data.test_tokenizer_fixtures import (  # noqa: F401  (session fixtures)
    EXTRA_TEXT, small_model, small_tokenizer, sp_tokenizer, stdlib_files, train_tool)

native_module = pytest.importorskip("megafim._native.bpe_tokenizer", reason="C++ extension not built")

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CODE_ALPHABET = list(" \t\n\r()[]{}:.,=+-*/#'\"_0123456789abcdefghijklmnopqrstuvwxyzABCDEFXYZ") + list("éü中😀\x00")
code_text = st.lists(st.one_of(st.sampled_from(["    ", "        ", "def ", "return ", "self.", "import ", "\n\n",
                                                "if __name__ == '__main__':", "  # ", "None", "True"]),
                               st.text(alphabet=CODE_ALPHABET, max_size=12)), max_size=40).map("".join)
any_text = st.text().filter(lambda t: "\u2581" not in t)


@pytest.fixture(scope="module")
def native(small_model):
    tok = Tokenizer.from_file(small_model, backend="native")
    assert tok.backend == "native" and tok._native.splits_words and tok._native.merges_by_ids
    return tok


@pytest.fixture(scope="module")
def sp(small_model):
    return spm.SentencePieceProcessor(model_file=small_model)


@SETTINGS
@given(text=st.one_of(any_text, code_text.filter(lambda t: "\u2581" not in t)))
def test_same_ids_as_sentencepiece(native, sp, text):
    assert native.encode(text) == sp.encode(text)


def _normal_pieces(tok) -> list[str]:
    pieces, _, types = tok.model_spec()
    return [p.decode().replace("\u2581", " ") for p, t in zip(pieces, types) if t == 1]


@SETTINGS
@given(data=st.data())
def test_words_joined_from_pieces_same_ids_as_sentencepiece(native, sp, data):
    # Runs of pieces make words with many merge choices; up to 64 bytes a word is merged by pairs of
    # piece ids (bpe_by_ids), longer ones by the heap over joined bytes: both must match.
    pieces = _normal_pieces(native)
    words = data.draw(st.lists(st.lists(st.sampled_from(pieces), min_size=1, max_size=24).map("".join),
                               min_size=1, max_size=4))
    text = " ".join(words)
    assert native.encode(text) == sp.encode(text)


def test_long_words_take_the_heap_path_and_stay_exact(native, sp):
    words = ["a" * 65, "_" * 200, "x1" * 40, "0123456789" * 9, "é" * 70, "abcdefghij" * 30]
    for w in words:
        text = f"{w} {w}:{w}"
        assert native.encode(text) == sp.encode(text), w[:20]


@SETTINGS
@given(text=st.lists(st.sampled_from(["a", " ", "▁", "▁▁", "\n", "x ", " ▁", "中", "def"]), max_size=30).map("".join))
def test_literal_space_symbol_follows_the_reference(native, sp_tokenizer, text):
    ids = native.encode(text)
    assert ids == sp_tokenizer.encode_reference(text)
    assert native.decode(ids) == text


@SETTINGS
@given(data=st.binary(max_size=64))
def test_malformed_utf8_bytes_like_sentencepiece(native, sp, data):
    # Sentencepiece reads each malformed byte as U+FFFD; C++ callers may pass such bytes.
    parts = data.split("\u2581".encode())
    expected = []
    for i, part in enumerate(parts):
        if i:
            expected += [native.token_bytes.index(bytes([b])) for b in "\u2581".encode()]
        expected += sp.encode(part) if part else []
    assert native._native.encode_bytes(data) == expected


def test_every_stdlib_file_round_trips(native):
    texts = []
    for path in stdlib_files():
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a few test files are deliberately not UTF-8
    assert len(texts) > 500
    for text, ids in zip(texts, native.encode_batch(texts, num_threads=2)):
        assert native.decode(ids) == text


def test_stdlib_sample_same_ids_as_sentencepiece(native, sp):
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(step=8)]
    texts = [t for t in texts if "\u2581" not in t]
    ours = native.encode_batch(texts, num_threads=2)
    theirs = sp.encode(texts, num_threads=2)
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a.tolist() != b]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} files differ, e.g. #{mismatched[0]}"


def test_word_cache_overflow_stays_exact(native, sp):
    # More distinct words than one workspace caches (2**18): the cache is cleared and refilled.
    rng = np.random.default_rng(0)
    words = [f"w{n:x}{'_' * int(k)}" for n, k in zip(rng.permutation(300_000), rng.integers(0, 3, 300_000))]
    text = " ".join(words + words[:1000])
    assert native.encode(text) == sp.encode(text)


def test_concurrent_encode_calls(native, sp):
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files(limit=16, step=30)]
    expected = [sp.encode(t) for t in texts]
    results: dict[int, list] = {}

    def work(k: int) -> None:
        results[k] = [native.encode(t) for t in texts[k::4]]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert results[k] == expected[k::4]


def test_encode_batch_rejects_non_str(native):
    with pytest.raises(TypeError, match="expected str"):
        native.encode_batch(["ok", b"bytes"])
    with pytest.raises(UnicodeEncodeError):
        native.encode("lone \ud800 surrogate")


def _train(tmp_path, name: str, **overrides) -> str:
    text = "\n".join(p.read_text(encoding="utf-8") for p in stdlib_files(limit=12, step=40)) + EXTRA_TEXT
    options = dict(model_type="bpe", vocab_size=600, byte_fallback=True, add_dummy_prefix=False,
                   normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                   allow_whitespace_only_pieces=True, max_sentence_length=1 << 16, unk_id=0, bos_id=-1,
                   eos_id=1, pad_id=-1, eos_piece="<|endoftext|>", minloglevel=2,
                   control_symbols=["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"])
    options.update(overrides)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n\n")),
                                   model_prefix=str(tmp_path / name), **options)
    return str(tmp_path / f"{name}.model")


def test_pieces_spanning_spaces_stay_exact(tmp_path):
    # Without whitespace splitting, pieces like "x▁" exist: the text must not be cut before spaces.
    path = _train(tmp_path, "nosplit", split_by_whitespace=False)
    tok = Tokenizer.from_file(path, backend="native")
    assert any(re.search(rb"[^ ] ", p) for p in tok.token_bytes)  # e.g. b" CAPITAL LETTER"
    sp = spm.SentencePieceProcessor(model_file=path)
    for p in stdlib_files(limit=30, step=23):
        text = p.read_text(encoding="utf-8")
        assert tok.encode(text) == sp.encode(text)


def test_unused_pieces_are_resegmented_like_sentencepiece(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(open(_train(tmp_path, "base"), "rb").read())
    marked = 0
    for i, piece in enumerate(proto.pieces):
        if piece.type == piece.NORMAL and len(piece.piece) >= 2 and i % 3 == 0:
            piece.type = piece.UNUSED
            marked += 1
    assert marked > 50
    path = tmp_path / "unused.model"
    path.write_bytes(proto.SerializeToString())
    tok = Tokenizer.from_file(path, backend="native")
    assert UNUSED in tok.model_spec()[2] and not tok._native.splits_words
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for p in stdlib_files(limit=30, step=23):
        text = p.read_text(encoding="utf-8")
        assert tok.encode(text) == sp.encode(text)


def test_piece_with_a_character_that_is_no_piece_merges_by_bytes(tmp_path):
    # Sentencepiece merges two symbols whenever their joined bytes are a piece, even a character that
    # is no piece of its own. Merging by piece ids would miss those merges, so such a model uses the
    # byte-keyed merge loop for every word.
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(open(_train(tmp_path, "base"), "rb").read())
    pieces = [p.piece for p in proto.pieces]
    dropped = next(c for c in "qkzjxv" if c in pieces and any(c in p and len(p) > 1 for p in pieces))
    del proto.pieces[pieces.index(dropped)]
    path = tmp_path / "dropped.model"
    path.write_bytes(proto.SerializeToString())
    tok = Tokenizer.from_file(path, backend="native")
    assert tok._native.splits_words and not tok._native.merges_by_ids
    sp = spm.SentencePieceProcessor(model_file=str(path))
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files(limit=30, step=23)]
    texts.append(f"{dropped} {dropped * 3} x{dropped}y {dropped}uit")
    for text in texts:
        assert tok.encode(text) == sp.encode(text)


def test_user_defined_symbols_fall_back_to_sentencepiece(tmp_path, caplog):
    path = _train(tmp_path, "userdef", user_defined_symbols=["<sep>"])
    with pytest.raises(ValueError, match="user-defined"):
        Tokenizer.from_file(path, backend="native")
    tok = Tokenizer.from_file(path)
    assert tok.backend == "sentencepiece"
    assert "user-defined" in caplog.text
    assert tok.encode("a <sep> b") == spm.SentencePieceProcessor(model_file=path).encode("a <sep> b")


def test_encoder_rejects_inconsistent_specs(small_tokenizer):
    pieces, scores, types = small_tokenizer.model_spec()
    with pytest.raises(ValueError, match="differ in length"):
        native_module.Encoder(pieces, scores[:-1], types)
    with pytest.raises(ValueError, match="defined twice"):
        native_module.Encoder(pieces + [pieces[-1]], scores + [0.0], types + [1])
    no_bytes = [(p, s, t) for p, s, t in zip(pieces, scores, types) if t != 6]
    with pytest.raises(ValueError, match="byte-fallback"):
        native_module.Encoder(*map(list, zip(*no_bytes)))
