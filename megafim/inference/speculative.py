"""Self-speculative decoding with the extra heads (Gloeckle et al. 2024, after Stern et al. 2018).

At the last accepted position the n heads guess the next n tokens: head 0's guess is the greedy token
itself, heads 1..n-1 draft the ones after it. One forward pass over the n drafted tokens then yields
head 0's greedy choice after each of them: drafts are accepted while they equal it, the caches are
cut back to the accepted tokens, and the heads' outputs at the last accepted position are the next
drafts. Every accepted token is one plain greedy decoding would have chosen, so the output is the same
as ``generate`` with temperature 0, in fewer forward passes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from megafim.inference.generate import check_length
from megafim.inference.kv_cache import ModelKVCache
from megafim.model.gpt import GPT


@dataclass
class SpeculativeStats:
    forward_passes: int = 0
    """Model calls after the prompt (plain greedy decoding needs one per token)."""
    tokens: int = 0
    drafted: int = 0
    """Tokens proposed by heads 1..n-1."""
    accepted: int = 0
    """Of those, tokens that matched greedy decoding."""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.forward_passes if self.forward_passes else 0.0


@torch.no_grad()
def speculative_generate(model: GPT, prompt: Sequence[int], max_new_tokens: int, *,
                         stop_ids: Collection[int] = ()) -> tuple[list[int], SpeculativeStats]:
    """Greedy continuation of ``prompt`` (identical to ``generate`` at temperature 0) and its stats."""
    model.eval()
    n = len(model.heads)
    device = model.embed_tokens.weight.device
    max_new = check_length(model, len(prompt), max_new_tokens)
    # Room for the prompt, the tokens kept and one draft that may run past the end.
    cache = ModelKVCache.for_model(model, 1, min(len(prompt) + max_new + n, model.config.max_seq_len))
    capacity = next(iter(cache.values())).k.shape[1]
    hidden = model.head_hidden(torch.tensor([list(prompt)], device=device), kv_caches=cache)  # (n, 1, T, d)
    draft = model.lm_head(hidden[:, 0, -1]).argmax(-1)  # (n,): draft[k] guesses the (k+1)-th next token
    out: list[int] = []
    stats = SpeculativeStats()
    stops = set(stop_ids)
    while len(out) < max_new:
        start = cache.length
        width = min(n, capacity - start)  # near the end of the context, draft fewer tokens
        candidate = draft[:width]
        # All heads at all drafted positions in one product. Unembedding only the rows read later
        # (head 0's, then the other heads' at the last accepted position) takes a second product: on a
        # GPU a second read of the weight, and on the CPU it measured no faster.
        logits = model.logits(candidate.view(1, -1), start_pos=start, kv_caches=cache)  # (n, 1, width, V)
        greedy = logits[0, 0].argmax(-1)  # (width,): greedy token after each candidate
        # One device-to-host copy per pass: the comparisons below run on Python ints.
        drafted, checked = torch.stack([candidate, greedy]).tolist()
        accepted = 1  # candidate[0] came from head 0: the greedy token already
        while accepted < width and drafted[accepted] == checked[accepted - 1]:
            accepted += 1
        stats.forward_passes += 1
        stats.drafted += width - 1
        stats.accepted += accepted - 1
        new = drafted[:accepted][: max_new - len(out)]
        for i, token in enumerate(new):
            if token in stops:
                new = new[: i + 1]
                break
        out.extend(new)
        if (new and new[-1] in stops) or len(out) >= max_new or start + accepted >= capacity:
            break
        cache.truncate(start + accepted)
        draft = logits[:, 0, accepted - 1].argmax(-1)
    stats.tokens = len(out)
    return out, stats
