"""The declarative map between megafim parameter names and Hugging Face ``LlamaForCausalLM``'s
(and ``Qwen2ForCausalLM``'s, which adds biases to q, k and v under the same names).

The trunk plus head 0 are exactly a Llama with ``n_layers`` layers: head 0 is HF layer n_layers - 1.
Heads 1.. have no Llama counterpart and are not in the map. No tensor is permuted or reshaped:
rotary uses HF's rotate_half convention (``megafim/model/layers.py``). A tied model has no
``lm_head.weight`` of its own, in either format.
"""

from __future__ import annotations

from megafim.model.config import ModelConfig

BLOCK_KEYS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
QKV_BIAS_KEYS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


def block_keys(config: ModelConfig) -> tuple[str, ...]:
    """Names of one transformer block's tensors under this config (biases only with ``qkv_bias``)."""
    return BLOCK_KEYS + (QKV_BIAS_KEYS if config.qkv_bias else ())


def hf_key_map(config: ModelConfig) -> dict[str, str]:
    """megafim name -> HF name, for every parameter that the HF model stores."""
    keys = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        keys["lm_head.weight"] = "lm_head.weight"
    blocks = [(f"layers.{i}", i) for i in range(config.n_trunk_layers)] + [("heads.0", config.n_trunk_layers)]
    for ours, hf_index in blocks:
        for key in block_keys(config):
            keys[f"{ours}.{key}"] = f"model.layers.{hf_index}.{key}"
    return keys
