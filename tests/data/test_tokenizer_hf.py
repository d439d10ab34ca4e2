"""The Hugging Face backend (megafim/data/tokenizer_hf.py) and the loader that picks a backend."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megafim.data.tokenizer import Tokenizer, load_tokenizer, require_fim
from megafim.data.tokenizer_hf import (BOUNDARY_AFTER_NEWLINE, BOUNDARY_ASCII_SPACE, BOUNDARY_NONE, HFTokenizer,
                                      NoEndOfTextError, add_fim_tokens)
from tests.data.hf_tokenizer_fixtures import (  # noqa: F401
    gpt2_fim, hf_dir, hf_fim_tokenizer, llama3_fim, llama3_plain, train_byte_level_bpe)
from tests.data.test_tokenizer_fixtures import REPO, small_model, stdlib_files, train_tool  # noqa: F401

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def without_end_of_text(src, out):
    """``src`` (a tokenizer.json) with its end-of-text token removed."""
    spec = json.loads(rust(src).to_str())
    spec["added_tokens"] = []
    del spec["model"]["vocab"]["<|end_of_text|>"]
    out.write_text(json.dumps(spec))
    return out


def add_fim_tokens_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "add_fim_tokens.py"), *map(str, args)],
                          capture_output=True, text=True)


def rust(path):
    from tokenizers import Tokenizer as RustTokenizer

    p = path / "tokenizer.json" if path.is_dir() else path
    return RustTokenizer.from_file(str(p))


def test_special_tokens_are_found_by_their_spellings(llama3_fim, gpt2_fim, llama3_plain):  # noqa: F811
    tok = load_tokenizer(llama3_fim)
    assert tok.special_pieces == {"eod": "<|end_of_text|>", "fim_prefix": "<|fim_prefix|>",
                                  "fim_middle": "<|fim_middle|>", "fim_suffix": "<|fim_suffix|>",
                                  "fim_pad": "<|fim_pad|>", "repo_name": None, "file_sep": None}
    r = rust(llama3_fim)
    assert (tok.eod, tok.fim_prefix, tok.fim_pad) == (r.token_to_id("<|end_of_text|>"),
                                                     r.token_to_id("<|fim_prefix|>"), r.token_to_id("<|fim_pad|>"))
    tok = load_tokenizer(gpt2_fim)
    assert tok.special_pieces["fim_middle"] == "<fim_middle>" and tok.eod == 0
    plain = load_tokenizer(llama3_plain)
    assert plain.fim_prefix is None and plain.eod is not None
    with pytest.raises(ValueError, match="tools/add_fim_tokens.py"):
        require_fim(plain)
    require_fim(load_tokenizer(llama3_fim))


def test_deepseek_spellings_and_named_tokens(hf_dir, llama3_plain):  # noqa: F811
    from tokenizers import AddedToken

    r = rust(llama3_plain)
    names = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "<｜end▁of▁sentence｜>", "<pad>", "<|reserved_0|>"]
    r.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    path = hf_dir / "deepseek_like.json"
    r.save(str(path))
    tok = load_tokenizer(path)
    ids = {n: r.token_to_id(n) for n in names}
    # DeepSeek-Coder: begin = prefix, hole = where the middle was (the suffix follows), end = middle.
    assert (tok.fim_prefix, tok.fim_suffix, tok.fim_middle, tok.fim_pad) == (
        ids["<｜fim▁begin｜>"], ids["<｜fim▁hole｜>"], ids["<｜fim▁end｜>"], ids["<pad>"])
    assert tok.eod == r.token_to_id("<|end_of_text|>")  # the first known spelling wins
    named = load_tokenizer(path, special_tokens={"eod": "<｜end▁of▁sentence｜>", "fim_pad": "<|reserved_0|>"})
    assert (named.eod, named.fim_pad) == (ids["<｜end▁of▁sentence｜>"], ids["<|reserved_0|>"])
    with pytest.raises(ValueError, match="no token '<nope>' \\(named as fim_pad\\)"):
        load_tokenizer(path, special_tokens={"fim_pad": "<nope>"})
    with pytest.raises(ValueError, match="expected names among"):
        load_tokenizer(path, special_tokens={"bos": "<pad>"})


def test_loader_picks_the_backend(llama3_fim, small_model, tmp_path):  # noqa: F811
    assert isinstance(load_tokenizer(llama3_fim), HFTokenizer)  # a directory
    assert isinstance(load_tokenizer(llama3_fim / "tokenizer.json"), HFTokenizer)
    assert isinstance(load_tokenizer(llama3_fim, "HuggingFaceTokenizer"), HFTokenizer)
    assert isinstance(Tokenizer.from_file(llama3_fim / "tokenizer.json"), HFTokenizer)  # old callers
    sp = load_tokenizer(small_model)
    assert isinstance(sp, Tokenizer) and sp.tokenizer_type == "GPTSentencePieceTokenizer"
    assert isinstance(load_tokenizer(small_model, "GPTSentencePieceTokenizer"), Tokenizer)
    with pytest.raises(ValueError, match="tokenizer type 'Llama'"):
        load_tokenizer(small_model, "Llama")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(small_model, "HuggingFaceTokenizer")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(llama3_fim / "tokenizer.json", "GPTSentencePieceTokenizer")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(tmp_path, "HuggingFaceTokenizer")  # a directory without tokenizer.json
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=f"{broken}: not a Hugging Face tokenizer.json"):
        load_tokenizer(broken)
    with pytest.raises(ValueError, match="special token names apply to Hugging Face tokenizers only"):
        load_tokenizer(small_model, special_tokens={"eod": "</s>"})


def test_refuses_what_it_cannot_represent(hf_dir, small_model, llama3_plain):  # noqa: F811
    from tokenizers import pre_tokenizers

    from megafim.convert.hf_tokenizer import build_hf_tokenizer

    spm_like = hf_dir / "spm_like.json"  # sentencepiece-style BPE with byte fallback: not byte-level
    build_hf_tokenizer(load_tokenizer(small_model)).save(str(spm_like))
    with pytest.raises(ValueError, match="only byte-level BPE tokenizers are supported"):
        load_tokenizer(spm_like)
    r = rust(llama3_plain)
    r.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    prefixed = hf_dir / "prefix_space.json"
    r.save(str(prefixed))
    with pytest.raises(ValueError, match="does not give texts back"):
        load_tokenizer(prefixed)
    # the plain message names no tool's flag (each tool names its own: test_no_end_of_text_...)
    with pytest.raises(NoEndOfTextError, match="; name the one it has as the special token eod$"):
        load_tokenizer(without_end_of_text(llama3_plain, hf_dir / "no_eod.json"))


@SETTINGS
@given(text=st.text(st.characters(codec="utf-8"), max_size=80))
def test_ids_are_the_libraries_and_round_trip(hf_fim_tokenizer, text):  # noqa: F811
    tok = hf_fim_tokenizer
    ids = tok.encode(text)
    assert ids == tok._hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert all(tok.token_bytes[i] for i in ids)  # never a special id


def test_special_spellings_stay_text(hf_fim_tokenizer):  # noqa: F811
    tok = hf_fim_tokenizer
    text = "".join(p for p in tok.special_pieces.values() if p) + " x"
    ids = tok.encode(text)
    assert not {tok.eod, tok.fim_prefix, tok.fim_middle, tok.fim_suffix, tok.fim_pad} & set(ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.fim_prefix, *tok.encode("a")]) == tok.special_pieces["fim_prefix"] + "a"


def test_token_bytes_are_what_the_library_decodes(hf_fim_tokenizer):  # noqa: F811
    tok = hf_fim_tokenizer
    checked = 0
    for i, b in enumerate(tok.token_bytes):
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: byte-level tokens may hold one
            continue
        if b:
            assert tok._hf.decode([i]) == text
            checked += 1
    assert checked > 1000
    assert sorted(b[0] for b in tok.token_bytes if len(b) == 1) == list(range(256))


def test_batch_encoders_and_pickling(hf_fim_tokenizer):  # noqa: F811
    tok = hf_fim_tokenizer
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files(limit=20, step=37)] + ["", "日本 x"]
    texts.insert(3, "a " + tok.special_pieces["eod"] + " b")  # encoded in the library's other mode
    texts.insert(7, tok.special_pieces["fim_prefix"])
    batch = tok.encode_batch(texts)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in texts]
    assert [b.tolist() for b in batch] == [tok._hf.encode(t, add_special_tokens=False).ids for t in texts]
    assert tok.encode_texts(texts) == [b.tolist() for b in batch]
    assert all(b.dtype == np.int32 for b in batch)
    flat, lengths = tok.encode_flat(texts)
    assert lengths.tolist() == [len(b) for b in batch] and flat.tolist() == sum((b.tolist() for b in batch), [])
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(texts[0]) == batch[0].tolist() and again.special_pieces == tok.special_pieces
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_add_fim_tokens_keeps_every_other_id(llama3_plain, llama3_fim, tmp_path):  # noqa: F811
    old, new = load_tokenizer(llama3_plain), load_tokenizer(llama3_fim)
    assert new.vocab_size == old.vocab_size + 4
    assert [new.fim_prefix, new.fim_middle, new.fim_suffix, new.fim_pad] == list(range(old.vocab_size, old.vocab_size + 4))
    assert new.token_bytes[:old.vocab_size] == old.token_bytes
    text = stdlib_files(limit=1, step=50)[0].read_text(encoding="utf-8")
    assert new.encode(text) == old.encode(text)
    # the command line; a tokenizer that has them all gets nothing added
    out = subprocess.run([sys.executable, str(REPO / "tools" / "add_fim_tokens.py"), "--tokenizer", str(llama3_fim),
                          "--output", str(tmp_path / "again")], capture_output=True, text=True)
    assert out.returncode == 0 and "nothing" in out.stdout
    out = subprocess.run([sys.executable, str(REPO / "tools" / "add_fim_tokens.py"), "--tokenizer",
                          str(tmp_path / "missing"), "--output", str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "missing" in out.stderr


def test_boundary_rule_is_chosen_from_the_pre_tokenizer(llama3_fim, gpt2_fim, hf_dir):  # noqa: F811
    from tokenizers import Regex, pre_tokenizers

    assert load_tokenizer(llama3_fim).fim_boundaries == BOUNDARY_AFTER_NEWLINE
    assert load_tokenizer(gpt2_fim).fim_boundaries == BOUNDARY_ASCII_SPACE
    r = rust(gpt2_fim)  # an unknown regex: FIM re-encodes whole parts (exact, slower)
    r.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|[^\w]+"), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    path = hf_dir / "unknown_regex.json"
    r.save(str(path))
    assert load_tokenizer(path).fim_boundaries == BOUNDARY_NONE


def test_add_fim_tokens_says_a_named_token_it_has_is_already_present(llama3_plain, tmp_path):  # noqa: F811
    """A spelling named by a flag that the tokenizer has already keeps its id and is listed as already
    present (before: reported as added); the other FIM tokens are added after the last id."""
    r = rust(llama3_plain)
    r.add_special_tokens(["<|reserved_0|>"])
    src = tmp_path / "reserved.json"
    r.save(str(src))
    reserved, n = r.token_to_id("<|reserved_0|>"), r.get_vocab_size(with_added_tokens=True)
    proc = add_fim_tokens_tool("--tokenizer", src, "--output", tmp_path / "out",
                               "--fim-prefix-token", "<|reserved_0|>")
    assert proc.returncode == 0, proc.stderr
    added, _, present = proc.stdout.strip().partition("; already present: ")
    assert added.endswith(f"added <|fim_middle|>={n} (fim_middle), <|fim_suffix|>={n + 1} (fim_suffix), "
                          f"<|fim_pad|>={n + 2} (fim_pad)"), proc.stdout
    eod = r.token_to_id("<|end_of_text|>")
    assert present == f"<|end_of_text|>={eod} (eod), <|reserved_0|>={reserved} (fim_prefix)"
    tok = load_tokenizer(tmp_path / "out", None, {"fim_prefix": "<|reserved_0|>"})
    assert tok.fim_prefix == reserved and tok.vocab_size == n + 3
    # all of them there: nothing added, each one listed
    again = add_fim_tokens_tool("--tokenizer", tmp_path / "out", "--output", tmp_path / "again",
                                "--fim-prefix-token", "<|reserved_0|>")
    assert again.returncode == 0 and "added nothing (it has them all); already present: " in again.stdout
    assert f"<|reserved_0|>={reserved} (fim_prefix)" in again.stdout and "added <" not in again.stdout


def test_add_fim_tokens_adds_the_end_of_text_named_by_its_flag(llama3_plain, tmp_path):  # noqa: F811
    """A tokenizer without end-of-text gets the one --eod-token names (before: the tool refused it,
    telling to use the very flag it had been given)."""
    no_eod = without_end_of_text(llama3_plain, tmp_path / "no_eod.json")
    proc = add_fim_tokens_tool("--tokenizer", no_eod, "--output", tmp_path / "out", "--eod-token", "<|eot|>")
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(tmp_path / "out", None, {"eod": "<|eot|>"})
    assert f"<|eot|>={tok.eod} (eod)" in proc.stdout and tok.fim_pad == tok.vocab_size - 1


def test_no_end_of_text_is_named_with_each_tools_flag(llama3_plain, tmp_path):  # noqa: F811
    """The same missing end-of-text, told in one line (exit 2) by each tool with the flag it has."""
    from megafim.data.indexed import IndexedDatasetBuilder
    from megafim.training.cli import config_from_args
    from megafim.training.config import ConfigError
    from megafim.training.loop import check_before_groups

    no_eod = without_end_of_text(llama3_plain, tmp_path / "no_eod.json")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "x = 1\n"}) + "\n")
    tools = {"preprocess_data.py": ["--input", source, "--output-prefix", tmp_path / "o"],
             "convert_hf_to_checkpoint.py": ["--load", tmp_path / "no_model", "--save", tmp_path / "save"]}
    for tool, args in tools.items():
        proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args),
                               "--tokenizer-model", str(no_eod)], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "no end-of-text token" in proc.stderr and "--eod-token" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().endswith("name it with --special-token eod=SPELLING"), proc.stderr
    assert not list(tmp_path.glob("o*")) and not (tmp_path / "save").exists()
    with IndexedDatasetBuilder(tmp_path / "data", np.uint16) as builder:
        builder.add_document(np.arange(1, 100))
    cfg, _ = config_from_args(["--tokenizer-model", str(no_eod), "--data-path", str(tmp_path / "data")])
    with pytest.raises(ConfigError, match="name it with data.special_tokens, e.g. --set 'data"):
        check_before_groups(cfg, 1)
