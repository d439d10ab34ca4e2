"""Training (and exporting) with a Hugging Face byte-level BPE tokenizer given as a directory."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.data.hf_tokenizer_fixtures import train_byte_level_bpe
from tests.training.conftest import CORPUS
from tests.training.launcher import REPO, base_args, check, launch, metrics


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    """(data prefix, tokenizer directory with FIM tokens, tokenizer.json without them)."""
    from megafim.data.tokenizer_hf import add_fim_tokens

    out = tmp_path_factory.mktemp("hf_data")
    plain = train_byte_level_bpe(out / "plain.json", "llama3", vocab_size=600)
    fim_dir = add_fim_tokens(plain, out / "tok")[0].parent
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", *[str(stdlib / n) for n in CORPUS],
                    "--output-prefix", str(out / "data"), "--tokenizer-model", str(fim_dir), "--append-eod",
                    "--quiet"], cwd=REPO, check=True, capture_output=True)
    return str(out / "data_text_document"), str(fim_dir), str(plain)


@pytest.mark.parametrize("which, extra, message", [
    ("plain", ["--fim-rate", "0.5"], "data.fim.rate 0.5: tokenizer"),
    ("plain", ["--fim-rate", "0.5"], "add them with tools/add_fim_tokens.py"),
    ("fim", ["--tokenizer-type", "Llama"], "data.tokenizer_type must be one of"),
    ("fim", ["--tokenizer-type", "GPTSentencePieceTokenizer"], "data.tokenizer_model: cannot load"),
    ("fim", ["--set", "data.special_tokens={bos: x}"], "data.special_tokens: unknown name"),
    ("fim", ["--set", "data.special_tokens={eod: <nope>}"], "no token '<nope>' (named as eod)"),
])
def test_tokenizer_checks_before_any_process_group(hf_data, which, extra, message):
    from megafim.training.cli import config_from_args
    from megafim.training.config import ConfigError
    from megafim.training.loop import check_before_groups

    data, fim_dir, plain = hf_data
    with pytest.raises(ConfigError, match=re.escape(message)):  # at parsing (choices) or before the groups
        cfg, _ = config_from_args(base_args((data, plain if which == "plain" else fim_dir)) + extra)
        check_before_groups(cfg, 1)


def test_trains_with_fim_and_the_checkpoint_carries_the_tokenizer(hf_data, tmp_path):
    from megafim.data.tokenizer import load_tokenizer
    from megafim.checkpoint.weights import tokenizer_path

    data, fim_dir, _ = hf_data
    save = tmp_path / "run"
    check(launch(1, base_args((data, fim_dir)) + ["--train-iters", "3", "--fim-rate", "0.9", "--zero-stage", "0",
                                                   "--tokenizer-type", "HuggingFaceTokenizer", "--save", str(save),
                                                   "--save-interval", "3"], tmp_path))
    losses = [r["loss"] for r in metrics(save)]
    assert len(losses) == 3 and all(x == x for x in losses)
    tok = load_tokenizer(tokenizer_path(save / "step_00000003"))
    assert tok.special_pieces == load_tokenizer(fim_dir).special_pieces

    # Export: AutoTokenizer gives our ids and knows the FIM tokens; the model infills with them.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint_to_hf.py"), "--load", str(save),
                           "--save", str(hf_out), "--dtype", "float32"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    auto = AutoTokenizer.from_pretrained(hf_out)
    text = "def add(a, b):\n    return a + b  # 日本\n"
    assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert auto.eos_token_id == tok.eod
    assert [auto.convert_tokens_to_ids(s) for s in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")] == [
        tok.fim_prefix, tok.fim_suffix, tok.fim_middle]
    model = AutoModelForCausalLM.from_pretrained(hf_out)
    prompt = auto("<|fim_prefix|>def add(a, b):\n    return <|fim_suffix|>\n<|fim_middle|>", add_special_tokens=False,
                  return_tensors="pt")
    assert prompt["input_ids"][0, 0].item() == tok.fim_prefix  # the sentinels are single ids in the prompt
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert load_tokenizer(hf_out / "megafim_tokenizer.model").special_pieces == tok.special_pieces
