"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from megafim.inference.kv_cache import ModelKVCache
from megafim.inference.sampling import SamplingConfig, next_token
from megafim.model.gpt import GPT


def next_token_logits(model: GPT, tokens: Tensor, cache: ModelKVCache) -> Tensor:
    """Feed tokens (B, T) after what ``cache`` holds; head 0's logits at the last position (B, V).

    Only that position is unembedded: the other rows of a prompt would cost a (T, d) x (d, V) product
    that nothing reads."""
    hidden = model.head_hidden(tokens, heads=[0], start_pos=cache.length, kv_caches=cache)[0]  # (B, T, d)
    return model.lm_head(hidden[:, -1])


def check_length(model: GPT, prompt_len: int, max_new_tokens: int) -> int:
    """The number of new tokens that fit in the model's context (an error if the prompt alone does not)."""
    room = model.config.max_seq_len - prompt_len
    if prompt_len == 0:
        raise ValueError("generate: the prompt is empty")
    if room < 1:
        raise ValueError(f"generate: the prompt has {prompt_len} tokens, the model's context max_seq_len = "
                         f"{model.config.max_seq_len} leaves no room to generate")
    return min(max_new_tokens, room)


@torch.no_grad()
def decode_loop(model: GPT, cache: ModelKVCache, new_tokens: Tensor, sampling: SamplingConfig,
                stop_ids: Collection[int], max_new_tokens: int, generator: torch.Generator | None) -> list[list[int]]:
    """Feed new_tokens (B, T) after the cache, then sample until every row stopped or max_new_tokens.

    Each returned row ends with its stop id when it met one."""
    batch = new_tokens.shape[0]
    logits = next_token_logits(model, new_tokens, cache)  # (B, V)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(max_new_tokens):
        token = next_token(logits, sampling, generator)  # (B,)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                out[row].append(t)
                done[row] = t in stop_ids
        if all(done) or cache.length + 1 > model.config.max_seq_len:
            break
        logits = next_token_logits(model, token.view(batch, 1), cache)
    return out


@torch.no_grad()
def generate(model: GPT, prompt: Sequence[int], sampling: SamplingConfig = SamplingConfig(), *,
             stop_ids: Collection[int] = (), num_samples: int = 1) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt`` (token ids), each ending at a stop id or at
    ``sampling.max_new_tokens`` (or the model's context). Greedy when ``sampling.temperature == 0``."""
    model.eval()
    device = model.embed_tokens.weight.device
    max_new = check_length(model, len(prompt), sampling.max_new_tokens)
    cache = ModelKVCache.for_model(model, num_samples, len(prompt) + max_new, heads=range(1))
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens = torch.tensor([list(prompt)] * num_samples, dtype=torch.long, device=device)
    return decode_loop(model, cache, tokens, sampling, set(stop_ids), max_new, generator)
