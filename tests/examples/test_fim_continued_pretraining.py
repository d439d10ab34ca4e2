"""examples/fim_continued_pretraining: settings are checked before any stage runs, and the whole
import -> FIM training with 4 heads -> export -> infill path runs at a tiny size, its export loading
with AutoModelForCausalLM / AutoTokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "fim_continued_pretraining" / "run.py"


def run_example(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--hf-model", "no/such/dir"], "--hf-model no/such/dir: no config.json"),
    (["--tokenizer", "no/such/tok"], "--tokenizer no/such/tok: no tokenizer.json there"),
    (["--data", "no/such.jsonl"], "--data no/such.jsonl: no such file or directory"),
    (["--config", "no/such.yaml"], "--config no/such.yaml: no such file"),
    (["--train-iters", "0"], "--train-iters 0: must be at least 1"),
    (["--vocab-size", "100"], "--vocab-size 100: must be at least 300"),
    (["--special-token", "bos=<s>"], "--special-token bos=<s>: expected NAME=SPELLING with NAME one of eod,"),
])
def test_bad_settings_fail_before_any_stage(tmp_path, args, message):
    result = run_example("--out", tmp_path / "out", *args, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fim_continued_pretraining: {message}")
    assert not (tmp_path / "out").exists() and "===" not in result.stdout


def test_a_non_empty_out_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_example("--out", tmp_path / "out", timeout=120)
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_a_model_with_fewer_embedding_rows_than_the_tokenizer_grows(tmp_path):
    """--hf-model and --tokenizer given: the 4 FIM tokens added are new ids, which the import gives
    embedding rows; the export has them and infills (~1 minute)."""
    transformers = pytest.importorskip("transformers")
    from tests.data.hf_tokenizer_fixtures import train_byte_level_bpe

    tok = train_byte_level_bpe(tmp_path / "tok.json", "llama3", vocab_size=400)
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    result = run_example("--out", out, "--hf-model", tmp_path / "hf", "--tokenizer", tok, "--train-iters", "2",
                         "--max-new-tokens", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "400 embedding rows, tokenizer 404 tokens (the import adds rows" in result.stdout
    assert "grew the vocabulary from 400 to 512 rows" in (out / "stages.log").read_text()
    assert json.loads((out / "hf" / "config.json").read_text())["vocab_size"] == 512
    infill = json.loads((out / "infill.json").read_text())
    assert infill["megafim_infill"] == infill["transformers_generate"]


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    """The CPU default with 4 training steps and a 512-token tokenizer (~2 minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    result = run_example("--out", out, "--train-iters", "4", "--vocab-size", "512", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for n, name in enumerate(("tokenizer", "model", "data", "import", "train", "export", "infill"), 1):
        assert f"=== {n}/7 {name}" in result.stdout

    # The run trained the imported model with FIM at 0.9 and 4 heads.
    saved = yaml.safe_load((out / "run" / "step_00000004" / "config.yaml").read_text())
    assert saved["data"]["fim"]["rate"] == 0.9 and saved["model"]["n_future"] == 4
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and "loss_head_4" in metrics[-1]

    # The export loads with transformers, knows the FIM tokens, and generates text.
    hf = out / "hf"
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert json.loads((hf / "mtp_heads.json").read_text())["n_future"] == 4
    sentinels = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    ids = [tok.convert_tokens_to_ids(s) for s in sentinels]
    assert len(set(ids)) == 3 and all(i >= 512 for i in ids)  # added after the trained vocabulary
    prompt = tok("<|fim_prefix|>def f(x):\n    return <|fim_suffix|>\n<|fim_middle|>", add_special_tokens=False,
                 return_tensors="pt")
    assert prompt["input_ids"][0, 0].item() == ids[0]
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    new_ids = gen[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(new_ids) == 6 and tok.decode(new_ids, skip_special_tokens=True)  # text (4 training steps: spaces)

    # megafim's infill of the export and transformers' greedy generate from it agree.
    infill = json.loads((out / "infill.json").read_text())
    assert infill["megafim_infill"] == infill["transformers_generate"]
    assert infill["final_step"] == 4


@pytest.mark.slow
def test_reserved_tokens_named_as_fim_tokens(tmp_path):
    """The Llama 3 route: the tokenizer has reserved special tokens, which --special-token names as
    the FIM tokens (no new ids, so the model needs no new rows); the names go with the import, and
    the training, the export and both infills use them without being told again (~2 minutes)."""
    from tokenizers import AddedToken, Tokenizer

    from tests.data.hf_tokenizer_fixtures import train_byte_level_bpe

    plain = train_byte_level_bpe(tmp_path / "plain.json", "llama3", vocab_size=500)
    tok = Tokenizer.from_file(str(plain))
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(4)]
    tok.add_special_tokens([AddedToken(r, special=True, normalized=False) for r in reserved])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    names = dict(zip(("fim_prefix", "fim_middle", "fim_suffix", "fim_pad"), reserved))
    out = tmp_path / "out"
    result = run_example("--out", out, "--tokenizer", tmp_path / "tok", "--train-iters", "2", "--max-new-tokens", "8",
                         *[f"--special-token={k}={v}" for k, v in names.items()])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "hf" / "config.json").read_text())["vocab_size"] == 504  # no token was added
    saved = yaml.safe_load((out / "run" / "step_00000002" / "config.yaml").read_text())
    assert saved["data"]["special_tokens"] == names  # from the import: the trainer was given no names
    assert "data.special_tokens" in (out / "stages.log").read_text()
    exported = json.loads((out / "hf" / "megafim_special_tokens.json").read_text())
    assert {k: exported[k] for k in names} == names
    infill = json.loads((out / "infill.json").read_text())
    assert infill["megafim_infill"] == infill["transformers_generate"]
