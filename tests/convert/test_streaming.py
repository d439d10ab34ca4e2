"""The one-tensor-at-a-time safetensors writer gives files the safetensors library reads back exactly."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megafim.convert.heads import fresh_head
from megafim.checkpoint.safetensors_stream import LazyState, TensorSource, save_safetensors_streaming
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT


def test_streamed_file_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
             "c.ids": torch.arange(11, dtype=torch.int64).view(11, 1), "empty": torch.zeros(0, 4),
             "half": torch.randn(2, 2, 2, generator=g).half(), "transposed": torch.randn(4, 6, generator=g).t()}
    save_safetensors_streaming(state, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_lazy_state_loads_on_access_and_checks_what_it_announced(tmp_path):
    calls = []

    def load():
        calls.append(1)
        return torch.ones(2, 3)

    lazy = LazyState({"w": TensorSource((2, 3), torch.float32, load), "bad": TensorSource((3,), torch.float32, load)})
    assert list(lazy) == ["w", "bad"] and lazy.spec("w") == ((2, 3), torch.float32) and not calls
    save_safetensors_streaming({"w": lazy["w"]}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="announced"):
        lazy["bad"]


def test_fresh_head_follows_the_models_initialisation():
    config = ModelConfig(vocab_size=64, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=64,
                         max_seq_len=32, n_future=3)
    head = fresh_head(config, 2, seed=1)
    reference = GPT(config).state_dict()
    assert head.keys() == {k for k in reference if k.startswith("heads.2.")}
    assert torch.equal(head["heads.2.input_layernorm.weight"], torch.ones(32))
    std = config.init_std
    assert head["heads.2.mlp.up_proj.weight"].std().item() == pytest.approx(std, rel=0.1)
    assert head["heads.2.mlp.down_proj.weight"].std().item() == pytest.approx(std / (2 * 3) ** 0.5, rel=0.1)
    assert torch.equal(fresh_head(config, 2, seed=1)["heads.2.mlp.up_proj.weight"], head["heads.2.mlp.up_proj.weight"])
