"""The model options that imported models need: q/k/v biases, Llama-3 RoPE scaling, tied embeddings."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

from megafim.checkpoint.state import TrainerState, write_trainer_state
from megafim.checkpoint.weights import write_model_dir
from megafim.inference.loading import load_model
from megafim.model import GPT, ModelConfigError, model_config
from megafim.model.config import ModelConfig, RopeScaling
from megafim.model.layers import rotary_inv_freq
from megafim.checkpoint.format import MODEL_DIR

SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


@pytest.mark.parametrize("value, field", [
    ({**SCALING, "type": "yarn"}, "rope_scaling.type"),
    ({**SCALING, "high_freq_factor": 1.0}, "high_freq_factor"),
    ({**SCALING, "factor": 0}, "rope_scaling.factor"),
    ({**SCALING, "original_max_position_embeddings": 0.5}, "original_max_position_embeddings"),
    ({**SCALING, "beta_fast": 32}, "beta_fast"),
    ("llama3", "rope_scaling must be null or a mapping"),
])
def test_bad_rope_scaling_names_its_field(value, field):
    with pytest.raises(ModelConfigError, match=field):
        model_config("tiny", rope_scaling=value)


@pytest.mark.parametrize("field", ["qkv_bias", "tie_embeddings"])
def test_flags_must_be_booleans(field):
    with pytest.raises(ModelConfigError, match=field):
        model_config("tiny", **{field: 1})


@pytest.mark.parametrize("bias, tie", [(True, False), (False, True), (True, True)])
def test_num_parameters_counts_biases_and_tied_embeddings(bias, tie):
    config = model_config("tiny", n_future=2, qkv_bias=bias, tie_embeddings=tie)
    model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == (3 * 5 if bias else 0) and all(not b.any() for b in biases)  # zero-initialised


def reference_llama3_inv_freq(head_dim, theta, s):
    """Llama 3's rule written per frequency, in plain Python."""
    out = []
    for j in range(0, head_dim, 2):
        f = 1.0 / theta ** (j / head_dim)
        wavelength = 2 * math.pi / f
        if wavelength < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(f)
        elif wavelength > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim, theta, scaling", [
    (16, 5e5, RopeScaling(**SCALING)), (128, 5e5, RopeScaling()), (64, 1e4, RopeScaling(4.0, 0.5, 2.0, 512))])
def test_llama3_frequencies_equal_their_definition(head_dim, theta, scaling):
    ours = rotary_inv_freq(head_dim, theta, scaling).double()
    reference = reference_llama3_inv_freq(head_dim, theta, scaling)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    plain = rotary_inv_freq(head_dim, theta).double()
    assert (ours <= plain).all() and (ours < plain).any() and (ours == plain).any()


def test_config_json_round_trip_and_tied_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_hidden_size=48, max_seq_len=128, rope_theta=5e5, rope_scaling=SCALING,
                         n_future=2, qkv_bias=True, tie_embeddings=True)
    assert isinstance(config.rope_scaling, RopeScaling)
    assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    model = GPT(config).eval()
    # the trainer saves named_parameters(), which lists the shared Parameter once, as the embedding
    write_model_dir(tmp_path / MODEL_DIR, dict(model.named_parameters()), config)
    write_trainer_state(tmp_path, TrainerState(), "")
    shard = next((tmp_path / MODEL_DIR).glob("*.safetensors"))
    with safe_open(str(shard), "pt") as fh:
        assert "lm_head.weight" not in fh.keys() and "heads.1.self_attn.v_proj.bias" in fh.keys()
    loaded = load_model(tmp_path).model
    assert loaded.config == config and loaded.lm_head.weight is loaded.embed_tokens.weight
    tokens = torch.randint(0, 64, (2, 100))
    with torch.no_grad():
        assert torch.equal(loaded.logits(tokens), model.logits(tokens))


def test_tied_gradient_is_the_sum_of_both_uses():
    """The fused loss and the embedding both write into one Parameter: its gradient must be the sum of
    what an untied copy gets in the embedding and in the unembedding."""
    torch.manual_seed(0)
    tied = GPT(model_config("tiny", n_future=2, n_layers=3, tie_embeddings=True))
    untied = GPT(model_config("tiny", n_future=2, n_layers=3))
    state = tied.state_dict()  # holds lm_head.weight too, the same tensor
    untied.load_state_dict(state)
    tokens = torch.randint(0, 512, (2, 33))
    for model in (tied, untied):
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    expected = untied.embed_tokens.weight.grad + untied.lm_head.weight.grad
    torch.testing.assert_close(tied.embed_tokens.weight.grad, expected, rtol=1e-5, atol=1e-7)
    assert untied.lm_head.weight.grad.abs().sum() > 0 and untied.embed_tokens.weight.grad.abs().sum() > 0
