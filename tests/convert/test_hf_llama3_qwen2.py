"""Llama 3.x (GQA, llama3 RoPE scaling, tied or untied) and Qwen2 (q/k/v biases) to megafim and back.

Small HF models are built from ``LlamaConfig`` / ``Qwen2Config`` with random weights and saved by
transformers itself. megafim's forward must equal HF's fp32 logits, greedy generation (megafim's KV
cache against HF's) must agree, and HF -> megafim -> HF must give the same model again.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafim.convert.heads import head_initialiser
from megafim.convert.hf_model import hf_to_megafim, megafim_to_hf, model_config_from_hf
from megafim.inference.generate import generate
from megafim.inference.loading import load_model
from megafim.inference.sampling import SamplingConfig
from megafim.model.config import RopeScaling
from megafim.model.gpt import GPT
from megafim.model.layers import rotary_inv_freq

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
VOCAB = 96
# original_max_position_embeddings 64 with factors 1 and 4 puts the head's 8 wavelengths (theta 5e5,
# head_dim 16: 6.3, 32, 166, ...) in all three bands of the llama3 rule: kept, interpolated, divided.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
CASES = {
    "llama3.1": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama3.2-tied": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2.5": (transformers.Qwen2Config, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                               tie_word_embeddings=True)),
    "qwen2-untied": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
}


def make_hf(name: str, out: Path):
    """Save a random HF model of case ``name`` to ``out``; return it (fp32, eval)."""
    cls, extra = CASES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**SHAPE, **extra)).eval()
    with torch.no_grad():  # random norms and biases, so a dropped or swapped one would show
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif pname.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return model


def megafim_model(hf_dir: Path, **kwargs) -> GPT:
    state, config = hf_to_megafim(hf_dir, **kwargs)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf(request.param, out), out


TOKENS = torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(1))


def test_config_is_read_as_written(case):
    name, hf, out = case
    config = model_config_from_hf(out)
    assert config.n_kv_heads == 2 and config.tie_embeddings == hf.config.tie_word_embeddings
    assert config.qkv_bias == name.startswith("qwen")
    assert config.rope_theta == hf.config.rope_parameters["rope_theta"]
    if name.startswith("llama3"):
        assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    else:
        assert config.rope_scaling is None


def test_megafim_forward_equals_hf_logits_and_greedy_generation(case):
    name, hf, out = case
    model = megafim_model(out)
    assert (model.lm_head.weight is model.embed_tokens.weight) == hf.config.tie_word_embeddings
    with torch.no_grad():
        ours = model.logits(TOKENS, heads=[0])[0]
        theirs = hf(TOKENS).logits
    assert (ours - theirs).abs().max().item() <= 1e-5, name
    prompt = TOKENS[0, :9].tolist()  # 9 + 100 new tokens run past original_max_position_embeddings
    ours_gen = generate(model, prompt, SamplingConfig(max_new_tokens=100))[0]
    with torch.no_grad():
        hf_gen = hf.generate(torch.tensor([prompt]), max_new_tokens=100, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert ours_gen == hf_gen


def test_hf_megafim_hf_round_trip(case, tmp_path):
    name, hf, out = case
    model = megafim_model(out)
    megafim_to_hf(model.state_dict(), model.config, tmp_path, dtype="float32")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is type(hf)
    assert back.config.rope_parameters == hf.config.rope_parameters
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert set(back.state_dict()) == set(hf.state_dict())
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    with torch.no_grad():
        assert (back(TOKENS).logits - hf(TOKENS).logits).abs().max().item() <= 1e-5
    prompt = TOKENS[1, :5]
    with torch.no_grad():
        kwargs = dict(max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(back.generate(prompt[None], **kwargs), hf.generate(prompt[None], **kwargs))
    again = model_config_from_hf(tmp_path)
    assert again == model.config


def test_transformers4_spelling_reads_the_same(case, tmp_path):
    """config.json as transformers 4 wrote it: top-level rope_theta, rope_scaling with ``type``."""
    name, _, out = case
    c = json.loads((out / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    c["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    (tmp_path / "config.json").write_text(json.dumps(c))
    assert model_config_from_hf(tmp_path) == model_config_from_hf(out)


def test_rope_parameters_theta_is_not_read_as_the_default(tmp_path):
    """transformers 5 writes the base only inside rope_parameters; it used to be read as 10000."""
    transformers.LlamaConfig(**SHAPE, rope_theta=500000.0).save_pretrained(tmp_path)
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())
    assert model_config_from_hf(tmp_path).rope_theta == 500000.0


def test_llama3_frequencies_equal_transformers_at_llama31_scale():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
    hf_config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                         max_position_embeddings=131072, rope_parameters=rope)
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rotary_inv_freq(128, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
    assert scale == 1.0 and torch.equal(ours, theirs.float())
    plain = rotary_inv_freq(128, 500000.0)
    assert torch.equal(ours[:10], plain[:10]) and torch.allclose(ours[-10:], plain[-10:] / 8)


def test_untied_import_and_new_heads_with_biases(case, tmp_path):
    name, hf, out = case
    head0, _ = hf_to_megafim(out, n_future=1)
    config = model_config_from_hf(out, 4)
    state, config = hf_to_megafim(out, n_future=4, init_new_head=head_initialiser(config, "copy", 0, head0),
                                  untie_embeddings=True)
    assert not config.tie_embeddings
    assert torch.equal(state["lm_head.weight"], hf.lm_head.weight)  # a copy of the embedding if tied
    for key in [k for k in state if k.startswith("heads.0.")]:
        assert torch.equal(state[key.replace("heads.0.", "heads.3.")], state[key]), key
    assert ("heads.2.self_attn.k_proj.bias" in state) == config.qkv_bias
    fresh = head_initialiser(config, "random", 0, head0)(1)
    if config.qkv_bias:
        assert not fresh["heads.1.self_attn.q_proj.bias"].any()  # biases start at zero, as in GPT
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():  # head 0 is still the HF model
        assert torch.equal(model.logits(TOKENS, heads=[0]), megafim_model(out).logits(TOKENS, heads=[0]))


def run_tool(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True)


def test_tools_round_trip_keeps_heads_biases_and_tied_embeddings(tmp_path):
    hf = make_hf("qwen2.5", tmp_path / "hf")
    result = run_tool("tools/convert_hf_to_checkpoint.py", "--load", tmp_path / "hf", "--save",
                      tmp_path / "ckpt", "--n-future", "4", "--init-heads", "copy")
    assert result.returncode == 0, result.stderr
    loaded = load_model(tmp_path / "ckpt").model
    assert loaded.config.qkv_bias and loaded.config.tie_embeddings and loaded.config.n_future == 4
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    result = run_tool("tools/convert_checkpoint_to_hf.py", "--load", tmp_path / "ckpt", "--save",
                      tmp_path / "back", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (back(TOKENS).logits - hf(TOKENS).logits).abs().max().item() <= 1e-5
    heads = json.loads((tmp_path / "back" / "mtp_heads.json").read_text())
    assert heads["shared"]["unembedding"] == "model.embed_tokens.weight"
    assert "self_attn.q_proj.bias" in heads["block_keys"]
    assert model_config_from_hf(tmp_path / "back") == loaded.config


def _config_json(**changes):
    return {"model_type": "llama", **SHAPE, **changes}


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=32), "use_sliding_window"),
    (dict(model_type="qwen2", layer_types=["full_attention", "sliding_attention", "full_attention"]),
     "layer_types"),
    (dict(model_type="mixtral"), "model_type 'mixtral'"),
    (dict(num_local_experts=8), "num_local_experts"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_parameters rope_type 'yarn'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling rope_type 'linear'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks low_freq_factor"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
])
def test_what_megafim_cannot_run_is_refused_naming_the_field(tmp_path, changes, field):
    (tmp_path / "config.json").write_text(json.dumps(_config_json(**changes)))
    with pytest.raises(ValueError, match=field):
        model_config_from_hf(tmp_path)


def test_the_import_tool_refuses_a_sliding_window_in_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    config = _config_json(model_type="qwen2", use_sliding_window=True)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    result = run_tool("tools/convert_hf_to_checkpoint.py", "--load", tmp_path / "hf", "--save",
                      tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "use_sliding_window" in result.stderr
    assert not (tmp_path / "out").exists()
