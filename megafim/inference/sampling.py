"""Choosing the next token from logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. ``temperature == 0`` is greedy decoding (top_p is then unused)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set to -inf every logit outside the smallest set of tokens whose probability reaches top_p.

    logits (..., V). The most likely token always survives, so the result is never all -inf."""
    if top_p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the tokens ranked above it already reach top_p.
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,)."""
    if config.greedy:
        return logits.argmax(-1)
    probs = top_p_filter(logits.float() / config.temperature, config.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
