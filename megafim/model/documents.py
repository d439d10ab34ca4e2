"""Packed contexts as documents: which tokens may attend to which, and the rotary position of each.

A training context packs several documents back to back (each ends with end-of-text; a FIM example
is one document with its sentinels). ``Documents`` says which document every input token and every
label belongs to, and what to do with that (Megatron's ``--reset-attention-mask`` and
``--reset-position-ids``). ``token_layout`` turns it into what the attention layers read once per
micro-batch: the queries' and keys' places in the sequence, their documents and the rotary
positions. Under context parallelism a rank holds some of the positions (``query_index``) and
attends to keys gathered from every rank (``key_index``); with neither, both are ``arange(T)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Documents:
    """The documents of a batch of packed contexts (as ``megafim.data.gpt_dataset`` emits them)."""

    segment_ids: Tensor
    """(B, T) int: the document of each input token, counted from 0 in its context, non-decreasing."""
    label_segment_ids: Tensor
    """(B, T) int: the document of each label (the next token): one more than the input's after an
    end-of-text token."""
    mask_attention: bool = True
    """A token attends only to earlier tokens of its own document; labels of head k that lie in a later
    document than their position are left out of the loss."""
    reset_positions: bool = True
    """Rotary positions restart at 0 at the first token of every document."""

    def __post_init__(self) -> None:
        if self.segment_ids.dim() != 2 or self.segment_ids.shape != self.label_segment_ids.shape:
            raise ValueError(f"Documents: segment_ids {tuple(self.segment_ids.shape)} and label_segment_ids "
                             f"{tuple(self.label_segment_ids.shape)} must both be (B, T)")


def positions_in_document(segment_ids: Tensor) -> Tensor:
    """(B, T) -> (B, T): each token's offset from the first token of its document."""
    seq = segment_ids.shape[1]
    index = torch.arange(seq, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # start of my document
    return index - first


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """Where one rank's tokens sit in their contexts: what the attention layers and rotary tables read."""

    rope_positions: Tensor
    """(B, Tq) rotary position of each query (= key) token this rank holds."""
    query_positions: Tensor
    """(Tq,) index in the full sequence of each token this rank holds."""
    key_positions: Tensor
    """(Tk,) index of each key the attention sees (every rank's tokens, in rank order, under context
    parallelism; ``query_positions`` otherwise)."""
    query_segments: Tensor | None
    """(B, Tq) document of each query, or None when tokens attend across documents."""
    key_segments: Tensor | None
    """(B, Tk) document of each key."""

    @functools.cached_property
    def keys_are_queries(self) -> bool:
        """True when the attention sees exactly this rank's tokens (no context parallelism)."""
        return self.key_positions.shape == self.query_positions.shape and bool(
            torch.equal(self.key_positions, self.query_positions))

    @functools.cached_property
    def allowed(self) -> Tensor:
        """(B, 1, Tq, Tk) bool: query i may attend to key j (earlier or itself, same document)."""
        causal = self.key_positions[None, :] <= self.query_positions[:, None]  # (Tq, Tk)
        if self.query_segments is None:
            return causal[None, None]
        same = self.query_segments[:, :, None] == self.key_segments[:, None, :]  # (B, Tq, Tk)
        return (same & causal)[:, None]

    @functools.cached_property
    def varlen(self) -> tuple[Tensor, int]:
        """(cu_seqlens int32 (docs + 1,), longest document) of the batch flattened to B*T tokens, for
        flash-attn's variable-length kernels; needs ``keys_are_queries`` and document segments."""
        seg = self.query_segments
        batch, seq = seg.shape
        flat = (seg + torch.arange(batch, device=seg.device)[:, None] * (int(seg.max()) + 1)).reshape(-1)
        starts = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
        edges = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), batch * seq)])
        return edges.to(torch.int32), int((edges[1:] - edges[:-1]).max())


def token_layout(documents: Documents | None, seq_len: int, *, query_index: Tensor | None = None,
                 key_index: Tensor | None = None, device: torch.device | None = None) -> TokenLayout:
    """The layout of a batch of ``seq_len``-token contexts, of which this rank holds positions
    ``query_index`` (default all) and attends to keys at ``key_index`` (default ``query_index``).

    Without documents every token sees every earlier one and positions are the sequence indices."""
    full = torch.arange(seq_len, device=device)
    q_idx = full if query_index is None else query_index.to(device)
    k_idx = q_idx if key_index is None else key_index.to(device)
    if documents is None:
        return TokenLayout(q_idx[None], q_idx, k_idx, None, None)
    seg = documents.segment_ids.to(device)
    if seg.shape[1] != seq_len:
        raise ValueError(f"Documents: segment_ids have {seg.shape[1]} positions, the contexts {seq_len}")
    rope = positions_in_document(seg) if documents.reset_positions else full.expand_as(seg)
    if not documents.mask_attention:
        return TokenLayout(rope[:, q_idx], q_idx, k_idx, None, None)
    return TokenLayout(rope[:, q_idx], q_idx, k_idx, seg[:, q_idx], seg[:, k_idx])
