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
from megafim.model.documents import TokenLayout
from megafim.model.layers import announce, apply_rotary, rotate_half


class KVCache(Protocol):
    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, T_new, n_kv, hd); return all cached keys and values (B, T_all, n_kv, hd)."""


try:  # looked up at import, not per call, so that torch.compile never traces an import
    from flash_attn import flash_attn_func as _FLASH_ATTN
    from flash_attn import flash_attn_varlen_func as _FLASH_ATTN_VARLEN
except ImportError:
    _FLASH_ATTN = _FLASH_ATTN_VARLEN = None


def _flash_attn_func():
    """flash-attn's ``flash_attn_func``, or None when flash-attn (a CUDA-only build) is not installed."""
    return _FLASH_ATTN


def _flash_attn_varlen_func():
    """flash-attn's ``flash_attn_varlen_func``, or None when flash-attn is not installed."""
    return _FLASH_ATTN_VARLEN


def document_attention(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout) -> Tensor:
    """Causal attention restricted by ``layout``: query i sees key j when j's position is not after
    i's and (with document segments) both are in the same document.

    q (B, Tq, H, hd) at ``layout.query_positions``, k and v (B, Tk, Hkv, hd) at ``layout.key_positions``;
    returns (B, Tq, H, hd). Every query sees at least itself, so no row of the softmax is empty."""
    batch, t_q, heads, hd = q.shape
    varlen = _flash_attn_varlen_func() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if varlen is not None and layout.query_segments is not None and layout.keys_are_queries:
        announce("document attention", "flash_attn.flash_attn_varlen_func")
        cu, longest = layout.varlen  # the B contexts flattened into one row of whole documents
        out = varlen(q.reshape(batch * t_q, heads, hd), k.reshape(batch * t_q, -1, hd),
                     v.reshape(batch * t_q, -1, hd), cu, cu, longest, longest, causal=True)
        return out.view(batch, t_q, heads, hd)
    if layout.query_segments is None and layout.keys_are_queries:
        return causal_attention(q, k, v)
    announce("document attention", "torch scaled_dot_product_attention with a boolean mask")
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, T, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.allowed, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``apply_rotary`` for tables of one position per (row, token), (B, T, hd), as with positions
    restarting per document; (T, hd) tables go to ``apply_rotary`` itself."""
    if cos.dim() == 2:
        return apply_rotary(x, cos, sin)
    cos, sin = cos.to(x.dtype)[:, :, None, :], sin.to(x.dtype)[:, :, None, :]  # (B, T, 1, hd)
    return x * cos + rotate_half(x) * sin


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
        # Context parallelism's hook (B, T_local, Hkv, hd) -> (B, T_keys, Hkv, hd); identity otherwise.
        self.kv_gather: nn.Module = nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None,
                layout: TokenLayout | None = None) -> Tensor:
        """x (B, T, d) -> (B, T, d); cos/sin (T, hd) or (B, T, hd) for the positions of x's tokens;
        ``layout`` (packed documents, context parallelism) restricts what each token attends to."""
        # Under sequence parallelism x is (B, T / tp, d) and the column-parallel q/k/v gather T back.
        q = self.q_proj(x)
        batch, seq = q.shape[:2]
        q = q.view(batch, seq, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, T_all, Hkv, hd)
        if layout is None:
            out = causal_attention(q, k, v)  # (B, T, H, hd)
        else:
            out = document_attention(q, self.kv_gather(k), self.kv_gather(v), layout)
        return self.o_proj(out.reshape(batch, seq, self.n_heads * self.head_dim))

