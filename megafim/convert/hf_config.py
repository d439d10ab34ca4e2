"""ModelConfig <-> a Hugging Face ``config.json`` (Llama 1-3.x and Qwen2/2.5), both ways.

Qwen2 is Llama with biases on q, k and v, so ``qkv_bias`` picks the architecture on export. RoPE
settings are read from transformers 5's ``rope_parameters`` and from the older top-level
``rope_theta`` / ``rope_scaling`` (either may be present); the export writes both spellings, so
transformers 4 and 5 read the same model. What megafim cannot run is refused with an error naming the
field, never dropped: a model that loaded but computed something else would be worse than none.
"""

from __future__ import annotations

import dataclasses

from megafim.model.config import ModelConfig, ModelConfigError, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Fields that only mixture-of-experts configs carry (Mixtral, Qwen2-MoE, DeepSeek); megafim's MLP is dense.
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
# Hugging Face's defaults where config.json leaves a field out (LlamaConfig's / Qwen2Config's).
DEFAULT_ROPE_THETA, DEFAULT_RMS_EPS = 10000.0, 1e-6


def hf_model_type(config: ModelConfig) -> str:
    return "qwen2" if config.qkv_bias else "llama"


def hf_rope_parameters(config: ModelConfig) -> dict:
    """transformers 5's ``rope_parameters``: the base and, when scaled, Llama 3's four numbers."""
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    s = config.rope_scaling
    return {"rope_type": s.type, "rope_theta": config.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}


def hf_config_kwargs(config: ModelConfig) -> dict:
    """The architecture fields of ``config.json`` (also keyword arguments of ``LlamaConfig`` /
    ``Qwen2Config``) for the trunk plus head 0."""
    rope = hf_rope_parameters(config)
    legacy_scaling = (None if config.rope_scaling is None
                      else {k: v for k, v in rope.items() if k != "rope_theta"})
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters=rope,
        rope_theta=config.rope_theta,  # transformers 4 reads these two; 5 reads rope_parameters
        rope_scaling=legacy_scaling,
    )
    if config.qkv_bias:
        kwargs.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    else:
        kwargs.update(attention_bias=False, mlp_bias=False)
    return kwargs


def hf_config_json(config: ModelConfig, *, dtype: str, eos_token_id: int | None) -> dict:
    """The whole ``config.json`` of an exported model."""
    model_type = hf_model_type(config)
    return {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "torch_dtype": dtype,
            "dtype": dtype, **hf_config_kwargs(config), "bos_token_id": None, "eos_token_id": eos_token_id,
            "pad_token_id": None, "use_cache": True}


def _rope_from_hf(c: dict, where: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` + ``rope_scaling``; both spellings of the type key (``rope_type``, ``type``)."""
    params = c.get("rope_parameters")
    field = "rope_parameters"
    if not params:
        params, field = dict(c.get("rope_scaling") or {}), "rope_scaling"
        if "rope_theta" in c:
            params["rope_theta"] = c["rope_theta"]
    if not isinstance(params, dict):
        raise ValueError(f"{where}: {field} {params!r} is not a mapping")
    if "layer_types" in params or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where}: {field} per layer type is not supported (megafim uses one RoPE for "
                         "all layers)")
    theta = float(params.get("rope_theta", c.get("rope_theta", DEFAULT_ROPE_THETA)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: {field}.partial_rotary_factor != 1 is not supported (megafim rotates "
                         "whole heads)")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{where}: {field} rope_type {rope_type!r} is not supported; megafim runs 'default' "
                         "and 'llama3'")
    names = [f.name for f in dataclasses.fields(RopeScaling) if f.name != "type"]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"{where}: {field} of type llama3 lacks {', '.join(missing)}")
    try:
        scaling = RopeScaling(**{n: params[n] for n in names})
    except ModelConfigError as exc:
        raise ValueError(f"{where}: {field}: {exc}") from None
    return theta, scaling


def _refuse_unsupported(c: dict, where: str) -> None:
    """One error naming the first field whose model megafim cannot run."""
    model_type = c.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type {model_type!r}; only {' and '.join(map(repr, ARCHITECTURES))} "
                         "convert to megafim")
    for field in MOE_FIELDS:
        if c.get(field):
            raise ValueError(f"{where}: {field} = {c[field]} (mixture of experts) is not supported; "
                             "megafim's MLP is dense")
    if model_type == "llama":
        if c.get("attention_bias"):
            raise ValueError(f"{where}: attention_bias = true (a bias on o_proj as well as q, k, v) is not "
                             "supported; megafim has q/k/v biases only (Qwen2's layout)")
        if c.get("mlp_bias"):
            raise ValueError(f"{where}: mlp_bias = true is not supported (megafim's MLP has no bias)")
    if c.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window = true is not supported (megafim attends to the "
                         "whole context)")
    windowed = [t for t in c.get("layer_types") or [] if t != "full_attention"]
    if windowed:
        raise ValueError(f"{where}: layer_types holds {windowed[0]!r}; megafim supports full_attention only")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {c['hidden_act']!r}; megafim's MLP is SwiGLU (silu)")


def model_config_from_hf_config(c: dict, where: str, n_future: int = 1) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` (already parsed); ``where`` names it in errors."""
    _refuse_unsupported(c, where)
    theta, scaling = _rope_from_hf(c, where)
    try:
        config = ModelConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            ffn_hidden_size=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
            rope_theta=theta, rope_scaling=scaling, norm_eps=float(c.get("rms_norm_eps", DEFAULT_RMS_EPS)),
            n_future=n_future, qkv_bias=c["model_type"] == "qwen2",
            tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise ValueError(f"{where}: no field {exc.args[0]}") from None
    except ModelConfigError as exc:
        raise ValueError(f"{where}: {exc}") from None
    head_dim = c.get("head_dim")
    if head_dim not in (None, config.head_dim):
        raise ValueError(f"{where}: head_dim {head_dim} != hidden_size / num_attention_heads = "
                         f"{config.head_dim}")
    return config
