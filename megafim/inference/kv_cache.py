"""Key/value caches for incremental decoding: one preallocated buffer per transformer block.

``Attention.forward`` calls ``cache.update(k, v)`` with the new tokens' keys and values and attends over
everything cached so far. The caches of one model share a length, so a speculative step that drafted
too far can ``truncate`` them all back to the tokens it accepted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megafim.model.gpt import GPT


class StaticKVCache:
    """Keys and values of one block: (B, max_len, n_kv_heads, head_dim) each, filled up to ``length``."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, T_new, n_kv, hd); return all cached keys and values (B, T_all, n_kv, hd)."""
        end = self.length + k.shape[1]
        if end > self.k.shape[1]:
            raise ValueError(f"KV cache full: {end} positions asked for, {self.k.shape[1]} allocated")
        self.k[:, self.length:end] = k
        self.v[:, self.length:end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


class ModelKVCache(dict):
    """``{"layers.0": StaticKVCache, ..., "heads.k": ...}`` for every block of a model."""

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_len: int, heads: range | None = None) -> "ModelKVCache":
        """Caches for the trunk and for ``heads`` (all of the model's heads by default)."""
        config = model.config
        param = model.embed_tokens.weight
        make = lambda: StaticKVCache(batch, max_len, config.n_kv_heads, config.head_dim,  # noqa: E731
                                     dtype=param.dtype, device=param.device)
        names = [f"layers.{k}" for k in model.layers] + [f"heads.{k}" for k in (heads or range(len(model.heads)))]
        return cls({name: make() for name in names})

    @property
    def length(self) -> int:
        """Positions cached (the same in every block)."""
        return next(iter(self.values())).length if self else 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (keys beyond it are simply overwritten later)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        for cache in self.values():
            cache.length = length
