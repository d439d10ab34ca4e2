"""The declarative map between megafim parameter names and Hugging Face ``LlamaForCausalLM``'s.

The trunk plus head 0 are exactly a Llama with ``n_layers`` layers: head 0 is HF layer n_layers - 1.
Heads 1.. have no Llama counterpart and are not in the map. No tensor is permuted or reshaped:
rotary uses HF's rotate_half convention (``megafim/model/layers.py``).
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


def hf_key_map(config: ModelConfig) -> dict[str, str]:
    """megafim name -> HF name, for every parameter that exists in ``LlamaForCausalLM``."""
    keys = {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    blocks = [(f"layers.{i}", i) for i in range(config.n_trunk_layers)] + [("heads.0", config.n_trunk_layers)]
    for ours, hf_index in blocks:
        for key in BLOCK_KEYS:
            keys[f"{ours}.{key}"] = f"model.layers.{hf_index}.{key}"
    return keys


def hf_llama_config_kwargs(config: ModelConfig) -> dict:
    """Keyword arguments of ``transformers.LlamaConfig`` for the trunk plus head 0."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
