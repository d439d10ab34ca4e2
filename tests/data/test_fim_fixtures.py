"""A small real BPE tokenizer for the FIM tests, trained on standard-library source, and its checks."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
# Characters the training text contains a few times (so some become pieces) and some it never sees
# (they always take the byte fallback).
EXTRA_TEXT = "π≈3.14 — naïve café, ü ö ä, 日本語のテキスト, ∑ x² ≤ y ½\n" * 3


def corpus_text(n_files: int = 40) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:n_files]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files) + EXTRA_TEXT


class SentencePieceTokenizer:
    """The tokenizer interface FIM needs, straight over a sentencepiece BPE model."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.eod, self.fim_prefix, self.fim_middle, self.fim_suffix, self.fim_pad = (
            self.sp.piece_to_id(s) for s in SPECIALS)
        self.vocab_size = self.sp.vocab_size()
        self.token_bytes = [self._bytes(i) for i in range(self.vocab_size)]

    def _bytes(self, i: int) -> bytes:
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return b""
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="session")
def fim_tokenizer(tmp_path_factory):
    """A tokenizer with byte fallback, sentinels and no pieces that join a non-space to a space."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("fim_tok")
    text = corpus_text()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n\n")), model_prefix=str(d / "bpe"), vocab_size=1200,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=1 << 20, control_symbols=SPECIALS, character_coverage=0.9995, unk_id=0,
        bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
    return SentencePieceTokenizer(str(d / "bpe.model"))


def test_tokenizer_round_trips_and_splits_at_words(fim_tokenizer):
    tok = fim_tokenizer
    text = corpus_text(3)[:20000] + "日本 😀 ∮ naïve  x"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes[i] for i in ids).decode() == text
    assert any(len(tok.token_bytes[i]) == 1 and tok.token_bytes[i][0] >= 0x80 for i in ids)  # byte fallback
    for b in tok.token_bytes:  # the property the fast path relies on
        assert not any(b[k] != 0x20 and b[k + 1] == 0x20 for k in range(len(b) - 1))
