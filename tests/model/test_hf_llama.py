"""The trunk plus head 0 is a Hugging Face LlamaForCausalLM under the plain key map (no permutation)."""

import pytest
import torch

from megafim.model import GPT, model_config
from megafim.convert.hf_config import hf_config_kwargs
from megafim.model.hf_keys import hf_key_map

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("n_future, n_kv_heads", [(1, 4), (2, 2), (3, 8)])
def test_logits_match_llama_for_causal_lm(n_future, n_kv_heads):
    torch.manual_seed(0)
    config = model_config("tiny", n_future=n_future, n_kv_heads=n_kv_heads, rope_theta=500.0, n_layers=3)
    model = GPT(config).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_kwargs(config))).eval()
    keys = hf_key_map(config)
    state = {keys[k]: v for k, v in model.state_dict().items() if k in keys}
    hf.load_state_dict(state, strict=True)  # every HF tensor is covered, with the same shape
    assert len(state) == len(hf.state_dict())
    # the extra heads are exactly what the map leaves out
    assert {k for k in model.state_dict() if k not in keys} == {
        k for k in model.state_dict() if k.startswith("heads.") and not k.startswith("heads.0.")}

    tokens = torch.randint(0, config.vocab_size, (2, 37))
    with torch.no_grad():
        ours = model.logits(tokens, heads=[0])[0]
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
