"""Building blocks of the Llama-style block: RMSNorm, rotary embeddings, SwiGLU MLP.

Fast paths (apex's fused RMSNorm) are chosen per call from the tensor's device, because the model is
built on the CPU and moved afterwards; which path runs is logged once.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megafim.model.config import RopeScaling

log = logging.getLogger("megafim.model")


def announce(kind: str, path: str) -> None:
    """Log, once per (kind, path), which implementation of ``kind`` runs (not while torch.compile
    traces a block: logging there would break its graph)."""
    if not torch.compiler.is_compiling():
        _log_once(kind, path)


@functools.cache
def _log_once(kind: str, path: str) -> None:
    log.info("%s: using %s", kind, path)


try:  # looked up at import, not per call, so that torch.compile never traces an import
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _APEX_RMS_NORM
except ImportError:
    _APEX_RMS_NORM = None


def _apex_rms_norm():
    """apex's fused RMSNorm function, or None when apex (a CUDA-only build) is not installed."""
    return _APEX_RMS_NORM


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (apex on CUDA when installed)."""
    fused = _apex_rms_norm() if x.is_cuda else None
    if fused is not None:
        announce("RMSNorm", "apex FusedRMSNorm")
        return fused(x, weight, weight.shape, eps)
    announce("RMSNorm", "torch.nn.functional.rms_norm")
    return F.rms_norm(x, weight.shape, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction), as in Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotary_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                    device: torch.device | None = None) -> Tensor:
    """The head_dim / 2 rotary frequencies ``theta^(-2j / head_dim)``, fp32, Llama-3-scaled if asked."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                                / head_dim))  # (hd/2,)
    return inv_freq if scaling is None else llama3_scaled_inv_freq(inv_freq, scaling)


def llama3_scaled_inv_freq(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3's context extension: frequencies whose wavelength exceeds ``original / low_freq_factor``
    positions are divided by ``factor``; those shorter than ``original / high_freq_factor`` are kept
    (they resolve local order, which a longer context does not change); in between, the divided and
    kept frequencies are mixed linearly in ``original / wavelength``."""
    wavelength = 2 * math.pi / inv_freq
    # 0 at the long-wavelength edge of the band, 1 at the short one
    mix = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (s.high_freq_factor
                                                                                    - s.low_freq_factor)
    mix = mix.clamp(0.0, 1.0)
    scaled = (1 - mix) * inv_freq / s.factor + mix * inv_freq
    # outside the band the clamp already gives 0 or 1; the explicit edges match the definition exactly
    scaled = torch.where(wavelength > s.original_max_position_embeddings / s.low_freq_factor,
                         inv_freq / s.factor, scaled)
    return torch.where(wavelength < s.original_max_position_embeddings / s.high_freq_factor, inv_freq, scaled)


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float,
                   scaling: RopeScaling | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables (T, head_dim), fp32, in Hugging Face Llama's layout.

    Frequency j (of head_dim / 2) is used by channels j and j + head_dim / 2: ``rotate_half`` pairs
    the two halves of the head, so weights export to ``LlamaForCausalLM`` without permuting q or k.
    Computed in fp32 on every call (a few KB) so that a bf16 model keeps exact positions.
    """
    inv_freq = rotary_inv_freq(head_dim, theta, scaling, positions.device)  # (hd/2,)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, H, hd) by the positions' angles; cos/sin are (T, hd)."""
    cos = cos.to(x.dtype)[None, :, None, :]  # (1, T, 1, hd)
    sin = sin.to(x.dtype)[None, :, None, :]
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020), Llama's MLP; names match Hugging Face."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
