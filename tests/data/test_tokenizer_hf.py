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
                                      add_fim_tokens)
from tests.data.hf_tokenizer_fixtures import (  # noqa: F401
    gpt2_fim, hf_dir, hf_fim_tokenizer, llama3_fim, llama3_plain, train_byte_level_bpe)
from tests.data.test_tokenizer_fixtures import REPO, small_model, stdlib_files, train_tool  # noqa: F401

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


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
    no_eod = hf_dir / "no_eod.json"
    spec = json.loads(rust(llama3_plain).to_str())
    spec["added_tokens"] = []
    del spec["model"]["vocab"]["<|end_of_text|>"]
    no_eod.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="no end-of-text token .* name it with --eod-token"):
        load_tokenizer(no_eod)


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
