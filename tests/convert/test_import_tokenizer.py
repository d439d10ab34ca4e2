"""tools/convert_hf_to_checkpoint.py keeps a Hugging Face tokenizer given as a directory (as
transformers saves them) with the imported checkpoint, and finds the model directory's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafim.data.tokenizer import load_tokenizer
from megafim.inference.loading import load_model
from tests.data.hf_tokenizer_fixtures import hf_dir, llama3_fim, llama3_plain  # noqa: F401

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]


def make_llama(out: Path, vocab_size: int) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=128)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert_hf_to_checkpoint.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, llama3_fim):  # noqa: F811
    out = tmp_path_factory.mktemp("hf_model")
    make_llama(out, load_tokenizer(llama3_fim).vocab_size)
    return out


def test_a_tokenizer_directory_is_kept_with_the_checkpoint(hf_model, llama3_fim, tmp_path):  # noqa: F811
    assert llama3_fim.is_dir()
    result = convert("--load", hf_model, "--save", tmp_path / "ckpt", "--tokenizer-model", llama3_fim)
    assert result.returncode == 0, result.stderr
    loaded = load_model(tmp_path / "ckpt")
    assert Path(loaded.tokenizer_path).read_bytes() == (llama3_fim / "tokenizer.json").read_bytes()
    tok = load_tokenizer(loaded.tokenizer_path)
    assert tok.special_pieces == load_tokenizer(llama3_fim).special_pieces and tok.fim_middle is not None


def test_the_model_directory_s_own_tokenizer_is_the_default(hf_model, llama3_fim, tmp_path):  # noqa: F811
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    for f in hf_model.iterdir():  # a transformers directory: model and tokenizer files side by side
        (model_dir / f.name).write_bytes(f.read_bytes())
    for f in llama3_fim.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    result = convert("--load", model_dir, "--save", tmp_path / "ckpt")
    assert result.returncode == 0, result.stderr
    saved = load_model(tmp_path / "ckpt").tokenizer_path
    assert Path(saved).read_bytes() == (llama3_fim / "tokenizer.json").read_bytes()


def test_a_directory_without_tokenizer_json_is_refused_before_writing(hf_model, tmp_path):
    (tmp_path / "not_a_tokenizer").mkdir()
    result = convert("--load", hf_model, "--save", tmp_path / "ckpt", "--tokenizer-model",
                     tmp_path / "not_a_tokenizer")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"convert_hf_to_checkpoint: tokenizer {tmp_path / 'not_a_tokenizer'}: a directory without tokenizer.json"]
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_a_tokenizer_with_added_tokens_grows_the_vocabulary(llama3_plain, llama3_fim, tmp_path, tied):  # noqa: F811
    """add_fim_tokens gave the tokenizer 4 new ids: the import adds rows (the mean of the old ones,
    rounded up to 128 rows) and leaves every old row, so the old tokens' logits stay the same."""
    from megafim.model.gpt import GPT

    old_vocab = load_tokenizer(llama3_plain).vocab_size
    assert load_tokenizer(llama3_fim).vocab_size == old_vocab + 4
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=old_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                      tie_word_embeddings=tied)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    result = convert("--load", tmp_path / "hf", "--save", tmp_path / "ckpt", "--tokenizer-model", llama3_fim)
    assert result.returncode == 0, result.stderr
    rows = -(-(old_vocab + 4) // 128) * 128
    assert f"grew the vocabulary from {old_vocab} to {rows} rows" in result.stdout
    model: GPT = load_model(tmp_path / "ckpt").model
    assert model.config.vocab_size == rows and model.config.tie_embeddings == tied
    embed = hf.model.embed_tokens.weight.detach()
    assert torch.equal(model.embed_tokens.weight[:old_vocab], embed)
    assert torch.allclose(model.embed_tokens.weight[old_vocab:], embed.mean(0).expand(rows - old_vocab, -1))
    tokens = torch.randint(0, old_vocab, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.logits(tokens, heads=[0])[0]  # (B, T, rows)
        assert (ours[..., :old_vocab] - hf(tokens).logits).abs().max().item() <= 1e-5


def test_fewer_rows_than_the_model_are_refused():
    from megafim.convert.vocab import grow_vocab
    from megafim.model.config import ModelConfig

    with pytest.raises(ValueError, match="fewer than the model's"):
        grow_vocab({}, ModelConfig(vocab_size=256), 128)
