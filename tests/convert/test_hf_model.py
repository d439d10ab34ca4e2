"""megafim <-> Hugging Face Llama: logits agree, greedy generation agrees, the round trip is exact."""

import json

import pytest
import torch

from megafim.convert.hf_model import HEADS_CONFIG, HEADS_FILE, hf_to_megafim, megafim_to_hf, model_config_from_hf
from megafim.inference.generate import generate
from megafim.inference.sampling import SamplingConfig
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT

transformers = pytest.importorskip("transformers")


def tiny(n_future=3, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=101, hidden_size=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_hidden_size=80,
                      max_seq_len=64, n_future=n_future)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny()
    out = tmp_path_factory.mktemp("hf")
    # A shard limit below one layer's size forces several shards and an index file.
    megafim_to_hf(model.state_dict(), model.config, out, dtype="float32", eos_token_id=1, max_shard_bytes=40_000)
    return model, out


def test_directory_layout(exported):
    _, out = exported
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    heads = json.loads((out / HEADS_CONFIG).read_text())
    assert heads["n_future"] == 3 and heads["heads_in_file"] == [1, 2]
    assert (out / HEADS_FILE).is_file()


def test_hf_logits_and_greedy_generation_match(exported):
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.logits(tokens, heads=[0])[0]
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    prompt = tokens[0, :7].tolist()
    ours_gen = generate(model, prompt, SamplingConfig(max_new_tokens=15))[0]
    with torch.no_grad():
        hf_gen = hf.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert ours_gen == hf_gen


def test_round_trip_is_exact(exported):
    model, out = exported
    state, config = hf_to_megafim(out)
    assert config == model.config
    reference = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_adding_heads_to_a_plain_llama(tmp_path):
    model = tiny(n_future=1)
    megafim_to_hf(model.state_dict(), model.config, tmp_path, dtype="float32")
    assert not (tmp_path / HEADS_FILE).exists()
    with pytest.raises(ValueError, match="holds no head 1"):
        hf_to_megafim(tmp_path, n_future=2)
    fresh = tiny(n_future=2, seed=5).state_dict()
    state, config = hf_to_megafim(tmp_path, n_future=2,
                                  init_new_head=lambda k: {n: t for n, t in fresh.items() if n.startswith(f"heads.{k}.")})
    assert config.n_future == 2
    two_heads = GPT(config)
    two_heads.load_state_dict(state)  # strict: every tensor present
    assert torch.equal(state["heads.1.mlp.up_proj.weight"], fresh["heads.1.mlp.up_proj.weight"])
    assert torch.equal(state["heads.0.mlp.up_proj.weight"], model.state_dict()["heads.0.mlp.up_proj.weight"])


def test_unsupported_hf_configs_fail_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="only 'llama'"):
        model_config_from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_config_from_hf(tmp_path / "nowhere")
