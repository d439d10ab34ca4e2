"""The model's typed configuration: one dataclass, checked once, with a clear error per field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class ModelConfigError(ValueError):
    """A ModelConfig field has a bad value; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style GPT with ``n_future`` output heads (Gloeckle et al. 2024).

    ``n_layers`` counts the trunk plus the first head, so ``n_future = 1`` is a plain Llama with
    ``n_layers`` layers; every further head adds one more transformer block.
    """

    vocab_size: int = 512
    """Rows of the embedding and of the (untied) unembedding."""
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
    """Base of the rotary frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    n_future: int = 1
    """Output heads; head i (0-based) predicts token t+i+1. 1 is ordinary next-token training."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (output projections get it / sqrt(2 n_layers))."""
    activation_checkpointing: bool = False
    """Recompute each trunk block's activations in the backward pass instead of storing them."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_size",
                     "max_seq_len", "n_future"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ModelConfigError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ModelConfigError("ModelConfig.activation_checkpointing must be true or false, "
                                   f"got {self.activation_checkpointing!r}")
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
        mlp = 3 * d * self.ffn_hidden_size
        block = attention + mlp + 2 * d  # two norms
        blocks = self.n_trunk_layers + self.n_future
        return blocks * block + d + 2 * self.vocab_size * d
