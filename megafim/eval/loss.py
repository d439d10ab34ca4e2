"""The FIM paper's loss evaluation, per head, in nats per token, on held-out ``.bin/.idx`` data.

- ``ar``: plain left-to-right test data (no FIM).
- ``fim_psm`` / ``fim_spm``: the same contexts with every piece FIM-transformed in one format.
- ``middle_psm`` / ``middle_spm``: the loss on the middle tokens of those FIM samples only,
  P(middle | prefix, suffix).
- ``middle_ar``: the same middle tokens scored left to right after their prefix alone (each piece
  rearranged to ``prefix middle <eot>``, no suffix, no sentinels): what a model trained without FIM can
  do, the paper's comparison. The middle tokens are the very ids of the FIM samples, so the two
  middle losses compare token for token.

Every number comes with its token count. Head k of a multi-token model is scored on the token k+1
positions ahead with the same masks.

A model trained with a document mask (``--reset-attention-mask`` / ``--reset-position-ids``,
``megafim.model.documents``) is scored the same way: each context's documents (each ends with
end-of-text; a FIM piece is one) attend only within themselves, and a label in a later document than
its position (a document's first token) is not scored, so a packed context scores exactly as its
documents scored one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from megafim.data.fim import FimConfig, FimTransform
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec, document_segments
from megafim.data.tokenizer import Tokenizer
from megafim.model.documents import Documents
from megafim.model.gpt import GPT

KINDS = ("ar", "fim_psm", "fim_spm", "middle_psm", "middle_spm", "middle_ar")


@dataclass
class HeadLosses:
    """Summed nats and token counts per head for one kind of loss."""

    nats: list[float]
    tokens: list[int]

    @property
    def mean(self) -> list[float]:
        return [n / t if t else float("nan") for n, t in zip(self.nats, self.tokens)]

    def add(self, nats: list[float], tokens: list[int]) -> None:
        self.nats = [a + b for a, b in zip(self.nats, nats)]
        self.tokens = [a + b for a, b in zip(self.tokens, tokens)]


@dataclass(frozen=True)
class DocumentMask:
    """How a packed context's documents are scored: as ``--reset-attention-mask`` and
    ``--reset-position-ids`` trained them (both off: plain causal attention over the whole context)."""

    reset_attention_mask: bool = False
    reset_position_ids: bool = False

    @property
    def on(self) -> bool:
        return self.reset_attention_mask or self.reset_position_ids

    def documents(self, segment_ids: torch.Tensor, label_segment_ids: torch.Tensor) -> Documents | None:
        if not self.on:
            return None
        return Documents(segment_ids.long(), label_segment_ids.long(),
                         mask_attention=self.reset_attention_mask, reset_positions=self.reset_position_ids)


@dataclass
class LossReport:
    n_future: int
    samples: int
    seq_length: int
    losses: dict[str, HeadLosses] = field(default_factory=dict)
    document_mask: DocumentMask = field(default_factory=DocumentMask)

    def as_dict(self) -> dict:
        return {"n_future": self.n_future, "samples": self.samples, "seq_length": self.seq_length,
                "reset_attention_mask": self.document_mask.reset_attention_mask,
                "reset_position_ids": self.document_mask.reset_position_ids,
                **{kind: {"loss": v.mean[0], "tokens": v.tokens[0], "per_head": v.mean,
                          "tokens_per_head": v.tokens} for kind, v in self.losses.items()}}


def left_to_right_middles(tokens: np.ndarray, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Rearrange every FIM piece of a PSM-transformed context to ``prefix middle <eot>``; mark the middles.

    Returns (tokens, middle_mask) of the same length, padded with ``fim_pad``, in context order. The
    context must come from PSM-only FIM (an empty-prefix PSM piece, ``<PRE><SUF> suffix <MID> middle``,
    has the same tokens as SPM, so the format cannot be read off the tokens). A piece cut by the
    context's end keeps the middle tokens it has, so the middles are exactly those of the PSM sample.
    The result starts with end-of-text, as after a previous document, so that a middle with an empty
    prefix still has a token before it and is scored too."""
    t = tokenizer
    out: list[int] = [t.eod]
    middle: list[bool] = [False]
    bounds = np.flatnonzero(tokens == t.eod)
    start = 0
    for end in [*bounds.tolist(), len(tokens)]:
        piece = tokens[start:end].tolist()
        start = end + 1
        if t.fim_prefix not in piece or t.fim_middle not in piece:
            continue  # not FIM, or cut before its middle
        # The context's first piece may start with the bytes of a character cut by the context's edge,
        # which the FIM transform leaves before <fim_prefix>: they are text that precedes the prefix.
        pre_at = piece.index(t.fim_prefix)
        suf_at = piece.index(t.fim_suffix, pre_at)
        mid_at = piece.index(t.fim_middle, suf_at)
        prefix, mid = piece[:pre_at] + piece[pre_at + 1:suf_at], piece[mid_at + 1:]
        out += [*prefix, *mid, t.eod]
        middle += [False] * len(prefix) + [True] * len(mid) + [False]
    pad = len(tokens) - len(out)
    return (np.asarray(out + [t.fim_pad] * pad, dtype=np.int64),
            np.asarray(middle + [False] * pad, dtype=bool))


@torch.no_grad()
def score(model: GPT, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
          documents: Documents | None = None) -> tuple[list[float], list[int]]:
    """Summed nats and target counts per head for a batch (B, T); mask (B, T) 0/1 float aligned with
    labels. ``documents``: the batch's packed documents, as the model was trained on them."""
    n = model.config.n_future
    # The targets each head averages over: mask[t + k], less (under a document mask) the labels in a
    # later document than t. With 0/1 masks, a mean times this count is the sum of nats.
    weights = model.targets(labels, mask, documents).weights  # (n, B, T)
    counts = [int((weights[k] != 0).sum().item()) for k in range(n)]
    if sum(counts) == 0:
        return [0.0] * n, counts
    head_losses = model(tokens, labels, mask, documents=documents).head_losses  # masked means
    return [float(head_losses[k]) * counts[k] for k in range(n)], counts


def _row_documents(rows: torch.Tensor, eod: int, mask: DocumentMask) -> Documents | None:
    """The documents of rows of L + 1 tokens (inputs ``rows[:, :-1]``, labels ``rows[:, 1:]``)."""
    if not mask.on:
        return None
    pairs = [document_segments(row, eod) for row in rows.cpu().numpy()]
    seg, label_seg = (torch.from_numpy(np.stack([p[i] for p in pairs])).to(rows.device) for i in (0, 1))
    return mask.documents(seg, label_seg)


def _batches(dataset: GPTDataset, batch_size: int):
    for first in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        yield {key: torch.stack([item[key] for item in items]) for key in items[0]}


def evaluate_losses(model: GPT, tokenizer: Tokenizer, data_path: str, *, seq_length: int,
                    num_samples: int | None = None, batch_size: int = 4, seed: int = 1234,
                    progress: Callable[[int, int], None] | None = None,
                    document_mask: DocumentMask = DocumentMask()) -> LossReport:
    """Every loss in ``KINDS`` over the first ``num_samples`` contexts of ``data_path`` (all by default).

    ``progress(done, total)`` is called after each batch; the work is three passes (AR, PSM, SPM)
    over the contexts, so ``total`` is three times their number. ``document_mask``: score each
    context's documents as the model was trained (module docstring)."""
    model.eval()
    device = model.embed_tokens.weight.device
    spec = GPTDatasetSpec(data_path, seq_length, seed, num_samples=None, split_name="eval", shuffle=False)
    eod = tokenizer.eod if document_mask.on else None  # the datasets then emit the documents
    plain = GPTDataset(spec, fim=None, document_eod=eod)
    count = len(plain) if num_samples is None else min(num_samples, len(plain))
    if count == 0:
        raise ValueError(f"{data_path}: too few tokens for one sample of seq_length {seq_length}")
    n = model.config.n_future
    report = LossReport(n, count, seq_length, {kind: HeadLosses([0.0] * n, [0] * n) for kind in KINDS},
                        document_mask)
    fim = {spm_rate: FimTransform(FimConfig(rate=1.0, spm_rate=spm_rate), tokenizer) for spm_rate in (0.0, 1.0)}
    datasets = {
        "ar": plain,
        "fim_psm": GPTDataset(spec, fim=fim[0.0], document_eod=eod),
        "fim_spm": GPTDataset(spec, fim=fim[1.0], document_eod=eod),
    }
    done = 0
    for name, dataset in datasets.items():
        subset = torch.utils.data.Subset(dataset, range(count))
        for batch in _batches(subset, batch_size):
            done += len(batch["tokens"])
            if progress is not None:
                progress(done, len(datasets) * count)
            tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
            mask = batch["loss_mask"].to(device)
            documents = None if eod is None else document_mask.documents(
                batch["segment_ids"].to(device), batch["label_segment_ids"].to(device))
            report.losses[name].add(*score(model, tokens, labels, mask, documents))
            if name == "ar":
                continue
            middle = mask * batch["middle_mask"].to(device).float()
            report.losses[name.replace("fim", "middle")].add(*score(model, tokens, labels, middle, documents))
            if name == "fim_psm":
                rows = [left_to_right_middles(torch.cat([t[:1], l]).numpy(), tokenizer)
                        for t, l in zip(batch["tokens"], batch["labels"])]
                ctx = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)
                mid = torch.from_numpy(np.stack([r[1] for r in rows])).to(device)
                report.losses["middle_ar"].add(*score(model, ctx[:, :-1], ctx[:, 1:], mid[:, 1:].float(),
                                                      _row_documents(ctx, tokenizer.eod, document_mask)))
    return report


def format_table(report: LossReport) -> str:
    """The report as a text table: one row per kind, one column per head."""
    heads = [f"head {k}" for k in range(report.n_future)]
    rows = [f"{'loss (nats/token)':<20}" + "".join(f"{h:>12}" for h in heads) + f"{'tokens':>12}"]
    for kind, v in report.losses.items():
        rows.append(f"{kind:<20}" + "".join(f"{m:>12.4f}" for m in v.mean) + f"{v.tokens[0]:>12}")
    return "\n".join(rows)
