"""Grouped-query causal self-attention with rotary positions.

The projections are separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears (Hugging Face names),
so tensor parallelism can swap each for a column- or row-parallel shard from outside; the local head
counts are attributes that ``apply_tensor_parallel`` divides.

A key/value cache plugs in without changes here: ``forward`` takes an optional object with
``update(k, v) -> (k_all, v_all)`` (new keys/values (B, T_new, n_kv, hd) in, everything cached so far
out), and the caller passes the rotary tables of the new tokens' absolute positions.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megafim.model.config import ModelConfig
from megafim.model.layers import announce, apply_rotary


class KVCache(Protocol):
    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, T_new, n_kv, hd); return all cached keys and values (B, T_all, n_kv, hd)."""


try:  # looked up at import, not per call, so that torch.compile never traces an import
    from flash_attn import flash_attn_func as _FLASH_ATTN
except ImportError:
    _FLASH_ATTN = None


def _flash_attn_func():
    """flash-attn's ``flash_attn_func``, or None when flash-attn (a CUDA-only build) is not installed."""
    return _FLASH_ATTN


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention, queries aligned to the END of the keys (the last query sees every key).

    q (B, Tq, H, hd), k and v (B, Tk, Hkv, hd) with H a multiple of Hkv and Tq <= Tk; returns
    (B, Tq, H, hd). Query head h uses key/value head h // (H / Hkv), Hugging Face's ``repeat_kv``.
    """
    flash = _flash_attn_func() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        announce("attention", "flash_attn.flash_attn_func")
        return flash(q, k, v, causal=True)  # aligns the causal mask bottom-right, as wanted here
    announce("attention", "torch scaled_dot_product_attention")
    t_q, t_k = q.shape[1], k.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, T, hd)
    gqa = q.shape[1] != k.shape[1]
    if t_q == t_k:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:  # cached decoding: SDPA's is_causal aligns top-left, so build the bottom-right mask
        rows = torch.arange(t_q, device=q.device)[:, None] + (t_k - t_q)
        mask = torch.arange(t_k, device=q.device)[None, :] <= rows  # (Tq, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, Tq, H, hd)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        # Heads held by this module: all of them, or this rank's share after apply_tensor_parallel.
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """x (B, T, d) -> (B, T, d); cos/sin (T, hd) for the absolute positions of x's tokens."""
        # Under sequence parallelism x is (B, T / tp, d) and the column-parallel q/k/v gather T back.
        q = self.q_proj(x)
        batch, seq = q.shape[:2]
        q = q.view(batch, seq, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, T_all, Hkv, hd)
        out = causal_attention(q, k, v)  # (B, T, H, hd)
        return self.o_proj(out.reshape(batch, seq, self.n_heads * self.head_dim))
