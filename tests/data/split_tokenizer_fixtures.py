"""Tokenizers with the repository-level tokens ``<repo_name>`` and ``<file_sep>`` (StarCoder2's
spelling), for the FIM-per-file tests: the session's sentencepiece model and a byte-level BPE one with
those two appended as special tokens. Import the fixtures from here."""

from __future__ import annotations

from pathlib import Path

import pytest

from megafim.data.tokenizer import CONTROL, Tokenizer, load_tokenizer
from tests.data.hf_tokenizer_fixtures import gpt2_fim, hf_dir  # noqa: F401  (session fixtures)
from tests.data.test_tokenizer_fixtures import small_model, train_tool  # noqa: F401

REPO_TOKENS = ("<repo_name>", "<file_sep>")


def with_control_pieces(model: str, out: Path, pieces=REPO_TOKENS) -> Path:
    """``model`` with ``pieces`` appended as control symbols (what tools/train_tokenizer.py makes of
    special tokens): the text never encodes to them, preprocessing writes their ids. Pieces the model
    already has (tools/train_tokenizer.py adds both) are kept as they are."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model).read_bytes())
    have = {p.piece for p in proto.pieces}
    for piece in pieces:
        if piece in have:
            continue
        proto.pieces.add(piece=piece, score=0.0, type=CONTROL)
    out.write_bytes(proto.SerializeToString())
    return out


@pytest.fixture(scope="session")
def split_model(small_model, tmp_path_factory) -> str:  # noqa: F811
    return str(with_control_pieces(small_model, tmp_path_factory.mktemp("split_tok") / "repo.model"))


@pytest.fixture(scope="session")
def split_tokenizer(split_model):
    """The C++ encoder path (FimTransform re-encodes in C++)."""
    tok = Tokenizer.from_file(split_model)
    assert tok.backend == "native"
    return tok


@pytest.fixture(scope="session")
def split_tokenizer_sp(split_model):
    """The same model through sentencepiece (FimTransform calls tokenizer.encode)."""
    return Tokenizer.from_file(split_model, backend="sentencepiece")


@pytest.fixture(scope="session")
def hf_split_tokenizer(gpt2_fim, hf_dir):  # noqa: F811
    """GPT-2 / StarCoder style with ``<repo_name>`` and ``<file_sep>`` added as special tokens."""
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer.from_file(str(gpt2_fim))
    rust.add_special_tokens(list(REPO_TOKENS))
    out = hf_dir / "gpt2_repo.json"
    rust.save(str(out))
    tok = load_tokenizer(out)
    assert all(tok.token_bytes[tok.token_id(t)] == b"" for t in REPO_TOKENS)  # special: no bytes
    return tok
