"""Byte-level BPE tokenizers in the style of Llama 3 and GPT-2 / StarCoder, trained once per test
session with the ``tokenizers`` library on stdlib source (no downloads); FIM tokens added with
megafim's own ``add_fim_tokens``. Import the fixtures from here."""

from __future__ import annotations

from pathlib import Path

import pytest

from megafim.data.tokenizer_hf import SPACE_SAFE_REGEXES
from tests.data.test_tokenizer_fixtures import EXTRA_TEXT, stdlib_files

# What the FIM tests draw texts from must be in the training text: accents, CJK (merged into tokens
# that hold parts of characters), emoji.
HF_EXTRA_TEXT = EXTRA_TEXT + "éüöä日本語π≈½— 日本語 日本 本語 Ωß\u00a0\u2028 😀😀 ᚠ𝔘∮\n" * 20


def train_byte_level_bpe(out: Path, style: str, vocab_size: int = 1500, with_fim: bool = False) -> Path:
    """A byte-level BPE tokenizer.json: ``llama3`` (Llama 3's split regex, then ByteLevel without
    its regex) or ``gpt2`` (ByteLevel's own regex, digits split one by one as StarCoder2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPACE_SAFE_REGEXES[1]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        eod = "<|end_of_text|>"
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        eod = "<|endoftext|>"
    tok.decoder = decoders.ByteLevel()
    specials = [eod] + (["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"] if with_fim else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    extra = out.parent / f"{out.stem}_extra.txt"
    extra.write_text(HF_EXTRA_TEXT, encoding="utf-8")
    tok.train([str(p) for p in stdlib_files(limit=120, step=12)] + [str(extra)], trainer)
    tok.save(str(out))
    return out


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_tokenizers")


@pytest.fixture(scope="session")
def llama3_plain(hf_dir) -> Path:
    """Llama-3 style, with end-of-text but no FIM tokens."""
    return train_byte_level_bpe(hf_dir / "llama3_plain.json", "llama3")


@pytest.fixture(scope="session")
def llama3_fim(hf_dir, llama3_plain) -> Path:
    """llama3_plain with ``<|fim_*|>`` added by add_fim_tokens (a directory)."""
    from megafim.data.tokenizer_hf import add_fim_tokens

    return add_fim_tokens(llama3_plain, hf_dir / "llama3_fim")[0].parent


@pytest.fixture(scope="session")
def gpt2_fim(hf_dir) -> Path:
    """GPT-2 / StarCoder style, trained with ``<fim_prefix>`` ... as special tokens."""
    return train_byte_level_bpe(hf_dir / "gpt2_fim.json", "gpt2", with_fim=True)


@pytest.fixture(scope="session", params=["llama3", "gpt2"])
def hf_fim_tokenizer(request, llama3_fim, gpt2_fim):
    from megafim.data.tokenizer import load_tokenizer

    return load_tokenizer(llama3_fim if request.param == "llama3" else gpt2_fim)
