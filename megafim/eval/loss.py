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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from megafim.data.fim import FimConfig, FimTransform
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec
from megafim.data.tokenizer import Tokenizer
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


@dataclass
class LossReport:
    n_future: int
    samples: int
    seq_length: int
    losses: dict[str, HeadLosses] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"n_future": self.n_future, "samples": self.samples, "seq_length": self.seq_length,
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
def score(model: GPT, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[int]]:
    """Summed nats and target counts per head for a batch (B, T); mask (B, T) float aligned with labels."""
    n = model.config.n_future
    counts = [int(mask[:, k:].sum().item()) for k in range(n)]
    if sum(counts) == 0:
        return [0.0] * n, counts
    head_losses = model(tokens, labels, mask).head_losses  # masked means
    return [float(head_losses[k]) * counts[k] for k in range(n)], counts


def _batches(dataset: GPTDataset, batch_size: int):
    for first in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        yield {key: torch.stack([item[key] for item in items]) for key in items[0]}


def evaluate_losses(model: GPT, tokenizer: Tokenizer, data_path: str, *, seq_length: int,
                    num_samples: int | None = None, batch_size: int = 4, seed: int = 1234,
                    progress: Callable[[int, int], None] | None = None) -> LossReport:
    """Every loss in ``KINDS`` over the first ``num_samples`` contexts of ``data_path`` (all by default).

    ``progress(done, total)`` is called after each batch; the work is three passes (AR, PSM, SPM)
    over the contexts, so ``total`` is three times their number."""
    model.eval()
    device = model.embed_tokens.weight.device
    spec = GPTDatasetSpec(data_path, seq_length, seed, num_samples=None, split_name="eval", shuffle=False)
    plain = GPTDataset(spec, fim=None)
    count = len(plain) if num_samples is None else min(num_samples, len(plain))
    if count == 0:
        raise ValueError(f"{data_path}: too few tokens for one sample of seq_length {seq_length}")
    n = model.config.n_future
    report = LossReport(n, count, seq_length, {kind: HeadLosses([0.0] * n, [0] * n) for kind in KINDS})
    datasets = {
        "ar": plain,
        "fim_psm": GPTDataset(spec, fim=FimTransform(FimConfig(rate=1.0, spm_rate=0.0), tokenizer)),
        "fim_spm": GPTDataset(spec, fim=FimTransform(FimConfig(rate=1.0, spm_rate=1.0), tokenizer)),
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
            report.losses[name].add(*score(model, tokens, labels, mask))
            if name == "ar":
                continue
            middle = mask * batch["middle_mask"].to(device).float()
            report.losses[name.replace("fim", "middle")].add(*score(model, tokens, labels, middle))
            if name == "fim_psm":
                rows = [left_to_right_middles(torch.cat([t[:1], l]).numpy(), tokenizer)
                        for t, l in zip(batch["tokens"], batch["labels"])]
                ctx = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)
                mid = torch.from_numpy(np.stack([r[1] for r in rows])).to(device)
                report.losses["middle_ar"].add(*score(model, ctx[:, :-1], ctx[:, 1:], mid[:, 1:].float()))
    return report


def format_table(report: LossReport) -> str:
    """The report as a text table: one row per kind, one column per head."""
    heads = [f"head {k}" for k in range(report.n_future)]
    rows = [f"{'loss (nats/token)':<20}" + "".join(f"{h:>12}" for h in heads) + f"{'tokens':>12}"]
    for kind, v in report.losses.items():
        rows.append(f"{kind:<20}" + "".join(f"{m:>12.4f}" for m in v.mean) + f"{v.tokens[0]:>12}")
    return "\n".join(rows)
