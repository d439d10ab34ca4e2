"""Fill in the middle: prompts in the formats the model was trained on, generation up to end-of-text.

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle>   -> middle <eot>
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix   -> middle <eot>

Each part is encoded on its own, as the FIM transform does at training time (docs/fim.md).

SPM puts the suffix first, so while a user keeps typing at the end of the prefix (an editor's usual
case) the keys/values of ``<fim_prefix><fim_suffix> suffix <fim_middle>`` and of the unchanged part of the
prefix stay valid: ``SpmInfillSession`` keeps them and feeds only the tokens that changed. In PSM the
suffix comes after the prefix, so any change to the prefix invalidates it (the paper's argument for SPM).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megafim.data.tokenizer import Tokenizer
from megafim.inference.generate import check_length, decode_loop, generate
from megafim.inference.kv_cache import ModelKVCache
from megafim.inference.sampling import SamplingConfig
from megafim.model.gpt import GPT

MODES = ("psm", "spm")


def fim_prompt_ids(prefix_ids: Sequence[int], suffix_ids: Sequence[int], pre: int, suf: int, mid: int,
                   mode: str) -> list[int]:
    """The FIM prompt layout on token ids (any tokenizer's), ending where the model writes the middle."""
    if mode == "psm":
        return [pre, *prefix_ids, suf, *suffix_ids, mid]
    if mode == "spm":  # the prefix comes last, so the middle continues it directly
        return [pre, suf, *suffix_ids, mid, *prefix_ids]
    raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")


def fim_prompt(tokenizer: Tokenizer, prefix: str, suffix: str, mode: str = "psm",
               max_tokens: int | None = None) -> list[int]:
    """Token ids of the infilling prompt; the model continues it with the middle.

    With ``max_tokens``, a prompt that is too long keeps the tokens nearest the hole: the end of the
    prefix and the start of the suffix (each gets half the room, or what the other leaves)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    pre, suf, mid = tokenizer.fim_prefix, tokenizer.fim_suffix, tokenizer.fim_middle
    p, s = tokenizer.encode(prefix), tokenizer.encode(suffix)
    if max_tokens is not None and len(p) + len(s) + 3 > max_tokens:
        room = max(max_tokens - 3, 0)
        keep_s = min(len(s), room // 2)
        keep_p = min(len(p), room - keep_s)
        keep_s = min(len(s), room - keep_p)
        p, s = p[len(p) - keep_p:], s[:keep_s]
    return fim_prompt_ids(p, s, pre, suf, mid, mode)


def middle_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The generated middle: everything before the first end-of-text."""
    ids = list(ids)
    if tokenizer.eod in ids:
        ids = ids[: ids.index(tokenizer.eod)]
    return tokenizer.decode(ids)


def infill(model: GPT, tokenizer: Tokenizer, prefix: str, suffix: str, *, mode: str = "psm",
           sampling: SamplingConfig = SamplingConfig(), num_samples: int = 1) -> list[str]:
    """``num_samples`` middles for (prefix, suffix), each stopped at end-of-text.

    A prompt too long for the model's context is trimmed away from the hole, leaving room for
    ``sampling.max_new_tokens`` (at most half the context)."""
    context = model.config.max_seq_len
    prompt = fim_prompt(tokenizer, prefix, suffix, mode,
                        max_tokens=context - min(sampling.max_new_tokens, context // 2))
    rows = generate(model, prompt, sampling, stop_ids={tokenizer.eod}, num_samples=num_samples)
    return [middle_text(tokenizer, row) for row in rows]


class SpmInfillSession:
    """Repeated SPM infilling against one suffix while the prefix changes, reusing the KV cache.

    ``complete(prefix)`` feeds only the prompt tokens after the longest common start with the prompt of
    the previous call; ``last_reused`` says how many prompt tokens came from the cache."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, suffix: str,
                 sampling: SamplingConfig = SamplingConfig()) -> None:
        self.model, self.tokenizer, self.suffix, self.sampling = model, tokenizer, suffix, sampling
        self.cache = ModelKVCache.for_model(model, 1, model.config.max_seq_len, heads=range(1))
        self.cached_prompt: list[int] = []  # prompt tokens whose keys/values the cache holds
        self.last_reused = 0
        device = model.embed_tokens.weight.device
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    @torch.no_grad()
    def complete(self, prefix: str) -> str:
        self.model.eval()
        prompt = fim_prompt(self.tokenizer, prefix, self.suffix, "spm")
        max_new = check_length(self.model, len(prompt), self.sampling.max_new_tokens)
        common = 0
        for a, b in zip(prompt, self.cached_prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # feed at least one token to get the next logits
        self.cache.truncate(common)  # also drops the previous call's generated tokens
        self.last_reused = common
        device = self.model.embed_tokens.weight.device
        new = torch.tensor([prompt[common:]], dtype=torch.long, device=device)
        self.cached_prompt = prompt
        row = decode_loop(self.model, self.cache, new, self.sampling, {self.tokenizer.eod}, max_new,
                          self.generator)[0]
        return middle_text(self.tokenizer, row)
