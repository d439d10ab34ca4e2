"""tools/train_tokenizer.py: inputs, the vocabulary size on many-character corpora, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm

from megafim.data.tokenizer import NORMAL, Tokenizer
from tests.data.test_tokenizer_fixtures import (  # noqa: F401  (session fixtures)
    REPO, small_model, small_tokenizer, stdlib_files, train_tool)


def cjk_corpus(n_chars: int = 3000, length: int = 60_000, seed: int = 0) -> str:
    """Text over n_chars distinct CJK characters (Zipf-like frequencies) with some code mixed in."""
    rng = np.random.default_rng(seed)
    alphabet = [chr(0x4E00 + i) for i in range(n_chars)]
    weights = 1.0 / np.arange(1, n_chars + 1)
    chars = rng.choice(n_chars, size=length, p=weights / weights.sum())
    lines = ["".join(alphabet[c] for c in chars[i:i + 40]) for i in range(0, length, 40)]
    code = "\n".join(p.read_text(encoding="utf-8") for p in stdlib_files(limit=5, step=97))
    return "\n".join(f"    x = '{line}'  # {i}" for i, line in enumerate(lines)) + "\n" + code


def test_vocab_size_is_honoured_with_many_distinct_characters(tmp_path, train_tool):
    text = cjk_corpus()
    (tmp_path / "cjk.txt").write_text(text, encoding="utf-8")
    prefix = tmp_path / "cjk"
    config = train_tool.TrainConfig(inputs=[str(tmp_path / "cjk.txt")], vocab_size=1000, output_prefix=str(prefix))
    # Plain sentencepiece with a usual coverage cannot fit the characters into 1000 pieces.
    with pytest.raises(RuntimeError):
        spm.SentencePieceTrainer.train(sentence_iterator=iter(train_tool.split_sentences(text, 8192)),
                                       model_writer=__import__("io").BytesIO(), model_type="bpe",
                                       vocab_size=1000, character_coverage=0.9999, byte_fallback=True,
                                       minloglevel=2)
    info = train_tool.train(config, log=lambda *_: None)
    tok = Tokenizer.from_file(f"{prefix}.model")
    assert tok.vocab_size == info["vocab_size"] == 1000
    assert tok.decode(tok.encode(text)) == text
    # The characters sentencepiece kept are the ones our mirror of its coverage loop predicted.
    pieces, _, types = tok.model_spec()
    single_chars = sum(1 for p, t in zip(pieces, types) if t == NORMAL and len(p.decode("utf-8")) == 1)
    assert single_chars == info["character_pieces"] <= (1000 - train_tool.N_META - train_tool.N_BYTES) // 2
    assert info["characters_cut_from_training"] == len(set(text)) - info["character_pieces"]


def test_kept_characters_mirrors_sentencepiece(train_tool):
    counts = Counter({"a": 50, "b": 30, "\t": 10, "c": 5, "d": 5})
    assert train_tool.kept_characters(counts, 0.5) == 1
    assert train_tool.kept_characters(counts, 0.8) == 2
    assert train_tool.kept_characters(counts, 0.85) == 3
    assert train_tool.kept_characters(counts, 1.0) == 5
    small_vocab = train_tool.N_META + train_tool.N_BYTES + 4  # room for 2 characters
    assert train_tool.choose_characters(counts, small_vocab, 0.8) == (0.8, set())
    assert train_tool.choose_characters(counts, small_vocab, 1.0) == (1.0, {"\t", "c", "d"})
    assert train_tool.drop_characters(["xaby", "c", "a\tb"], {"x", "y", "\t", "c"}) == ["ab", "a", "b"]


def test_newlines_and_indentation_are_learned(small_tokenizer):
    pieces = small_tokenizer.token_bytes
    assert any(b"\n" in p and len(p) > 1 for p in pieces)
    assert b"    " in pieces and b"        " in pieces


def test_split_sentences_cuts_at_lines_within_the_limit(train_tool):
    text = "short line\n" * 50 + "x" * 3000 + "\n" + "é" * 700 + "\nend"
    chunks = train_tool.split_sentences(text, 256)
    assert "".join(chunks) == text
    assert all(len(c.encode()) <= 256 for c in chunks)
    assert chunks[0].endswith("\n") and chunks[0].count("\n") > 1


def test_directory_input_skips_binary_non_utf8_and_site_packages(tmp_path, train_tool):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages" / "dep").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("def f():\n    return 1\n" * 50)
    (root / "pkg" / "b.rs").write_text("fn main() {}\n" * 50)
    (root / "pkg" / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (root / "pkg" / "blob.txt").write_bytes(b"abc\x00def")
    (root / "pkg" / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / "site-packages" / "dep" / "c.py").write_text("third party\n")
    config = train_tool.TrainConfig(inputs=[str(root)], vocab_size=300, output_prefix=str(tmp_path / "t"))
    sources, jsonl = train_tool.collect_inputs(config)
    assert sorted(p.name for p in sources) == ["a.py", "b.rs", "blob.txt", "latin1.py"] and not jsonl
    sentences, stats = train_tool.load_corpus(config)
    assert (stats.files, stats.documents, stats.skipped_binary, stats.skipped_non_utf8) == (4, 2, 1, 1)
    assert "".join(sentences).count("def f()") == 50


def test_jsonl_input_with_several_keys(tmp_path, train_tool):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "alpha\n", "code": "beta\n"}), "{not json", json.dumps({"text": "gamma\n"}),
             json.dumps(["a list"]), ""]
    path.write_text("\n".join(lines) + "\n")
    config = train_tool.TrainConfig(inputs=[str(path)], vocab_size=300, output_prefix=str(tmp_path / "t"),
                                    json_keys=("text", "code"))
    sentences, stats = train_tool.load_corpus(config)
    assert sentences == ["alpha\n", "beta\n", "gamma\n"]
    assert stats.skipped_bad_json == 1 and stats.skipped_missing_key == 3
    assert any(":2: malformed JSON" in e for e in stats.examples)


def test_max_bytes_caps_the_sample(tmp_path, train_tool):
    for i in range(20):
        (tmp_path / f"f{i}.py").write_text(f"x{i} = {i}\n" * 100)
    config = train_tool.TrainConfig(inputs=[str(tmp_path / "*.py")], vocab_size=300,
                                    output_prefix=str(tmp_path / "t"), max_bytes=3000)
    _, stats = train_tool.load_corpus(config)
    assert stats.truncated_by_max_bytes and stats.documents < 20 and 3000 <= stats.bytes < 6000


@pytest.mark.parametrize("inputs, error, words", [
    (["{tmp}/missing_dir"], FileNotFoundError, ["missing_dir"]),
    (["{tmp}/*.nothing"], FileNotFoundError, ["*.nothing", "glob"]),
    (["{tmp}/empty.py"], ValueError, ["no usable text", "empty"]),
    (["{tmp}/bin.py"], ValueError, ["no usable text", "1 binary"]),
])
def test_unusable_inputs_fail_naming_them(tmp_path, train_tool, inputs, error, words):
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "bin.py").write_bytes(b"\x00\x01")
    config = train_tool.TrainConfig(inputs=[s.format(tmp=tmp_path) for s in inputs], vocab_size=300,
                                    output_prefix=str(tmp_path / "t"))
    with pytest.raises(error) as err:
        train_tool.train(config, log=lambda *_: None)
    for word in words:
        assert word in str(err.value)


def test_vocabulary_too_large_for_the_corpus(tmp_path, train_tool):
    (tmp_path / "tiny.py").write_text("x = 1\ny = 2\n" * 10)
    config = train_tool.TrainConfig(inputs=[str(tmp_path / "tiny.py")], vocab_size=5000,
                                    output_prefix=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="--vocab-size 5000"):
        train_tool.train(config, log=lambda *_: None)
    assert not (tmp_path / "t.model").exists()


@pytest.mark.parametrize("field, value, flag", [
    ("vocab_size", 100, "--vocab-size"), ("threads", 0, "--threads"), ("max_bytes", 0, "--max-bytes"),
    ("character_coverage", 1.5, "--character-coverage"), ("inputs", [], "--input"),
])
def test_config_validation_names_the_flag(train_tool, field, value, flag):
    kwargs = dict(inputs=["x"], vocab_size=1000, output_prefix="out")
    kwargs[field] = value
    with pytest.raises(ValueError, match=flag):
        train_tool.TrainConfig(**kwargs)


def test_command_line(tmp_path):
    for i, path in enumerate(stdlib_files(limit=8, step=101)):
        (tmp_path / f"m{i}.py").write_text(path.read_text(encoding="utf-8"))
    prefix = tmp_path / "out" / "tok"
    cmd = [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input", str(tmp_path),
           "--vocab-size", "500", "--output-prefix", str(prefix), "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "special ids eod=1, fim_prefix=2" in done.stdout
    for suffix in (".model", ".vocab", ".json"):
        assert (tmp_path / "out" / f"tok{suffix}").is_file()
    assert len((tmp_path / "out" / "tok.vocab").read_text(encoding="utf-8").splitlines()) == 500
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "nope")] + cmd[4:], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
