"""The exported Hugging Face tokenizer gives our ids and decodes back exactly."""

import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megafim.convert.hf_tokenizer import save_hf_tokenizer
from megafim.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tok")
    prefix = root / "tok"
    import subprocess, sys
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(repo / "tools/train_tokenizer.py"), "--input", str(STDLIB / "json"),
                    str(STDLIB / "email"), "--vocab-size", "1200", "--output-prefix", str(prefix)],
                   check=True, capture_output=True)
    ours = Tokenizer.from_file(f"{prefix}.model")
    hf = transformers.AutoTokenizer.from_pretrained(save_hf_tokenizer(ours, root / "hf"))
    return ours, hf


def hf_ids(hf, text):
    return hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_special_tokens_share_ids(pair):
    ours, hf = pair
    for name in ("eod", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad"):
        piece = ours.id_to_piece(getattr(ours, name))
        assert hf.convert_tokens_to_ids(piece) == getattr(ours, name)
    assert hf.eos_token_id == ours.eod
    # A prompt written with the sentinels as text gives the sentinel ids (what infilling prompts rely on).
    assert hf("<fim_prefix>x", add_special_tokens=False)["input_ids"][0] == ours.fim_prefix


def test_stdlib_files_same_ids(pair):
    ours, hf = pair
    files = sorted(STDLIB.glob("*.py"))[:60]
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8", errors="strict")
        ids = hf_ids(hf, text)
        assert ids == ours.encode(text), path
        assert hf.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=60))
def test_any_text_same_ids(pair, text):
    ours, hf = pair
    ids = hf_ids(hf, text)
    assert ids == ours.encode(text)
    assert hf.decode(ids) == text
