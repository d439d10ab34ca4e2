"""The tokenizers the FIM tests use (a small model trained by tools/train_tokenizer.py), and a check
of the tokenizer property the fast path relies on."""

from __future__ import annotations

import pytest

from megafim.data.tokenizer import Tokenizer
from tests.data.test_tokenizer_fixtures import small_model, train_tool  # noqa: F401  (session fixtures)


@pytest.fixture(scope="session")
def fim_tokenizer(small_model):  # noqa: F811
    """The real tokenizer, with its C++ encoder (FimTransform then re-encodes in C++)."""
    return Tokenizer.from_file(small_model)


@pytest.fixture(scope="session")
def fim_tokenizer_sp(small_model):  # noqa: F811
    """The same model encoding through sentencepiece (FimTransform then calls tokenizer.encode)."""
    return Tokenizer.from_file(small_model, backend="sentencepiece")


def test_tokenizer_has_what_fim_needs(fim_tokenizer):
    tok = fim_tokenizer
    assert tok.backend == "native"
    text = "def f(x):\n    return x  # 日本 😀 ∮ naïve  x\u2581"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes[i] for i in ids).decode() == text
    assert any(len(tok.token_bytes[i]) == 1 and tok.token_bytes[i][0] >= 0x80 for i in ids)  # byte fallback
    for i in (tok.eod, tok.fim_prefix, tok.fim_middle, tok.fim_suffix, tok.fim_pad):
        assert tok.token_bytes[i] == b""
    for b in tok.token_bytes:  # no piece joins a non-space to a following space: words encode alone
        assert not any(b[k] != 0x20 and b[k + 1] == 0x20 for k in range(len(b) - 1)), b
