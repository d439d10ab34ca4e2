"""The model's typed configuration: one dataclass, checked once, with a clear error per field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class ModelConfigError(ValueError):
    """A ModelConfig field has a bad value; the message names the field."""


ROPE_SCALING_TYPES = ("llama3",)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling, to extend a model trained at
    ``original_max_position_embeddings`` tokens (docs/model.md has the formula).

    Wavelengths shorter than ``original / high_freq_factor`` are kept, longer than
    ``original / low_freq_factor`` are stretched by ``factor``, and the band between is interpolated."""

    factor: float = 8.0
    """How much the low frequencies are slowed down (Llama 3.1: 8)."""
    low_freq_factor: float = 1.0
    """Wavelengths above ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``."""
    high_freq_factor: float = 4.0
    """Wavelengths below ``original_max_position_embeddings / high_freq_factor`` are left alone."""
    original_max_position_embeddings: int = 8192
    """Context length the unscaled model was trained at."""
    type: str = "llama3"
    """The scaling rule; only ``llama3`` (Hugging Face's ``rope_type``)."""

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise ModelConfigError(f"ModelConfig.rope_scaling.type {self.type!r} is not supported; "
                                   f"known: {', '.join(ROPE_SCALING_TYPES)}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ModelConfigError(f"ModelConfig.rope_scaling.{name} must be a positive number, "
                                       f"got {value!r}")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ModelConfigError(f"ModelConfig.rope_scaling.high_freq_factor = {self.high_freq_factor} "
                                   f"must be above low_freq_factor = {self.low_freq_factor}")
        value = self.original_max_position_embeddings
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelConfigError("ModelConfig.rope_scaling.original_max_position_embeddings must be a "
                                   f"positive integer, got {value!r}")

    @classmethod
    def from_value(cls, value) -> "RopeScaling | None":
        """None, a RopeScaling, or a mapping of its fields (a YAML override, model_config.json)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ModelConfigError(f"ModelConfig.rope_scaling must be null or a mapping, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ModelConfigError(f"ModelConfig.rope_scaling has no field(s) {unknown}; "
                                   f"known: {sorted(known)}")
        return cls(**value)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style GPT with ``n_future`` output heads (Gloeckle et al. 2024).

    ``n_layers`` counts the trunk plus the first head, so ``n_future = 1`` is a plain Llama with
    ``n_layers`` layers; every further head adds one more transformer block.
    """

    vocab_size: int = 512
    """Rows of the embedding and of the unembedding."""
    hidden_size: int = 64
    """Width d of the residual stream."""
    n_layers: int = 4
    """Transformer blocks in the trunk plus the first head (the trunk has ``n_layers - 1``)."""
    n_heads: int = 8
    """Query heads per attention layer; ``hidden_size / n_heads`` is the head dimension."""
    n_kv_heads: int = 4
    """Key/value heads (grouped-query attention); equal to ``n_heads`` is plain multi-head attention."""
    ffn_hidden_size: int = 176
    """Inner width of the SwiGLU MLP (gate and up projections)."""
    max_seq_len: int = 256
    """Longest sequence the model is trained or sampled at (rotary positions are computed up to it)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (Megatron's ``--rotary-base``; Llama 3: 500000)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    n_future: int = 1
    """Output heads; head i (0-based) predicts token t+i+1. 1 is ordinary next-token training."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (output projections get it / sqrt(2 n_layers))."""
    activation_checkpointing: bool = False
    """Recompute each trunk block's activations in the backward pass instead of storing them."""
    rope_scaling: RopeScaling | None = None
    """Llama-3-style scaling of the rotary frequencies (a mapping of ``RopeScaling``'s fields), or none."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2); the output projection never has one."""
    tie_embeddings: bool = False
    """The unembedding (``lm_head``) is the embedding matrix itself (Llama 3.2 1B/3B, small Qwen2)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_scaling", RopeScaling.from_value(self.rope_scaling))
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_size",
                     "max_seq_len", "n_future"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ModelConfigError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        for name in ("activation_checkpointing", "qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"ModelConfig.{name} must be true or false, "
                                       f"got {getattr(self, name)!r}")
        if self.hidden_size % self.n_heads:
            raise ModelConfigError(f"ModelConfig.n_heads = {self.n_heads} must divide "
                                   f"hidden_size = {self.hidden_size}")
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError(f"ModelConfig.n_kv_heads = {self.n_kv_heads} must divide n_heads = "
                                   f"{self.n_heads} (each key/value head serves a group of query heads)")
        if self.head_dim % 2:
            raise ModelConfigError(f"ModelConfig: head dimension hidden_size / n_heads = {self.head_dim} "
                                   "must be even (rotary embeddings rotate pairs of channels)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def n_trunk_layers(self) -> int:
        """Blocks before the heads: ``n_layers - 1`` (the first head is the last Llama layer)."""
        return self.n_layers - 1

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again); unknown names are an error naming them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ModelConfigError(f"ModelConfig has no field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameters of the whole model (trunk, all heads, final norm, embedding and unembedding)."""
        d, kv = self.hidden_size, self.n_kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2  # q, o; k, v
        if self.qkv_bias:
            attention += d + 2 * kv
        mlp = 3 * d * self.ffn_hidden_size
        block = attention + mlp + 2 * d  # two norms
        blocks = self.n_trunk_layers + self.n_future
        return blocks * block + d + (1 if self.tie_embeddings else 2) * self.vocab_size * d
