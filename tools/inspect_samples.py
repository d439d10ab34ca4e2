#!/usr/bin/env python3
"""Show the training samples exactly as the model sees them, FIM sentinels and loss mask included.

    python tools/inspect_samples.py --data-path data/stdlib_text_document --tokenizer-model tok/stdlib.model \\
        --seq-length 512 --fim-rate 0.9 --start 0 --num-samples 3 [--json]

Samples come from ``GPTDataset`` (the same packing, shuffle and per-sample FIM seed as training with
``--seed``). Text output: each sample decoded, sentinels written as their names, spans that are not
trained on wrapped in ``[[masked: ...]]``. ``--json``: one object per line with ``index``, ``epoch``,
``tokens`` (the ``seq_length + 1`` context), ``loss_mask`` and ``middle_mask`` (per token, as a
target: the model is trained on predicting token t from tokens < t where ``loss_mask[t]`` is 1),
``modes`` (per end-of-text-separated piece, or per file with ``--fim-split-token``: ar / psm / spm),
``segment_ids`` (per token: its document, as ``--reset-attention-mask`` sees it) and ``text``.
See docs/fim.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafim.data.fim import FimConfig, FimResult, FimTransform  # noqa: E402
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec, document_segments  # noqa: E402
from megafim.data.indexed import resolve_dataset_prefix  # noqa: E402
from megafim.data.tokenizer import TOKENIZER_TYPES, Tokenizer, load_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="dataset prefix (<prefix>.bin/.idx), or its .bin/.idx path")
    p.add_argument("--tokenizer-model", required=True,
                   help="the tokenizer the dataset was made with (.model, or HF tokenizer.json / directory)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="default: from --tokenizer-model")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--fim-rate", type=float, default=0.0)
    p.add_argument("--fim-spm-rate", type=float, default=0.5)
    p.add_argument("--fim-level", choices=["context", "document"], default="context")
    p.add_argument("--mask-sentinels", action="store_true", help="leave the FIM sentinels out of the loss")
    p.add_argument("--fim-split-token", default=None, metavar="TOKEN",
                   help="FIM each file of a document separately, files separated by this token (e.g. <file_sep>)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--split-name", default="train", help="the split whose FIM seed to use")
    p.add_argument("--start", type=int, default=0, help="first sample index")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="index cache directory (default: build in memory)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample and line")
    args = p.parse_args(argv)
    if args.seq_length < 1:
        p.error(f"--seq-length {args.seq_length}: must be >= 1")
    if args.num_samples < 0 or args.start < 0:
        p.error("--start and --num-samples must be >= 0")
    return args


def sample(ds: GPTDataset, fim: FimTransform, i: int) -> tuple[int, FimResult]:
    """Sample ``i`` as GPTDataset.__getitem__ composes it, but the whole context and the modes."""
    epoch = ds.epoch_of(i)
    return epoch, fim(ds.context(i), seed=ds.fim_seed, epoch=epoch, index=i)


def render(tok: Tokenizer, out: FimResult) -> str:
    """The decoded context; runs that are not trained on in [[masked: ...]], padding counted."""
    parts: list[str] = []
    tokens, mask = out.tokens.tolist(), out.loss_mask > 0
    start = 0
    for end in range(1, len(tokens) + 1):
        if end < len(tokens) and mask[end] == mask[start]:
            continue
        run = tokens[start:end]
        if mask[start]:
            parts.append(tok.decode(run))
        else:
            pads = sum(1 for t in run if t == tok.fim_pad)
            text = tok.decode([t for t in run if t != tok.fim_pad])
            parts.append(f"[[masked: {text}{f'<fim_pad> x{pads}' if pads else ''}]]")
        start = end
    return "".join(parts)


def segments(tok: Tokenizer, out: FimResult) -> list[int]:
    """The document of every context token (a new one after each end-of-text), as training sees it."""
    inputs, labels = document_segments(out.tokens, tok.eod)
    return [*inputs.tolist(), *labels[-1:].tolist()]


def emit(stream: TextIO, tok: Tokenizer, i: int, epoch: int, out: FimResult, as_json: bool,
         split: bool = False) -> None:
    text = render(tok, out)
    seg = segments(tok, out)
    if as_json:
        obj = {"index": i, "epoch": epoch, "modes": out.modes, "tokens": out.tokens.tolist(),
               "loss_mask": out.loss_mask.astype(int).tolist(), "middle_mask": out.middle_mask.astype(int).tolist(),
               "segment_ids": seg, "text": text}
        stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
        return
    trained = int(out.loss_mask.sum())
    lengths = [seg.count(s) for s in range(seg[-1] + 1)]
    unit = "files" if split else "pieces"
    stream.write(f"=== sample {i} (epoch {epoch}): {unit} {', '.join(out.modes)}; {len(out.tokens)} tokens, "
                 f"{trained} trained on, {int(out.middle_mask.sum())} in middles; {len(lengths)} documents of "
                 f"{', '.join(map(str, lengths))} tokens\n{text}\n\n")


def main(argv: list[str] | None = None, stream: TextIO = sys.stdout) -> int:
    """Exit code 0, or 2 with one line on stderr for a bad path, tokenizer or flag value."""
    args = parse_args(argv)
    try:
        inspect(args, stream)
    except (ValueError, OSError) as err:  # IndexedDatasetError is a ValueError; FileNotFoundError an OSError
        print(f"inspect_samples: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


def inspect(args: argparse.Namespace, stream: TextIO) -> None:
    try:
        tok = load_tokenizer(args.tokenizer_model, args.tokenizer_type)
    except (ValueError, OSError) as err:
        raise ValueError(f"--tokenizer-model: {err}") from None
    prefix = resolve_dataset_prefix(args.data_path, "--data-path")
    try:
        fim = FimTransform(FimConfig(rate=args.fim_rate, spm_rate=args.fim_spm_rate, level=args.fim_level,
                                     mask_sentinels=args.mask_sentinels, split_token=args.fim_split_token), tok)
    except ValueError as err:
        flag = "--fim-split-token" if "split_token" in str(err) else "--fim-rate"
        raise ValueError(f"{flag}: {err}") from None
    spec = GPTDatasetSpec(path_prefix=prefix, seq_length=args.seq_length, seed=args.seed,
                          split_name=args.split_name)
    ds = GPTDataset(spec, fim=fim, cache_dir=args.cache_dir)
    if args.start >= len(ds):
        raise ValueError(f"--start {args.start}: {prefix} has {len(ds)} samples of {args.seq_length + 1} tokens")
    for i in range(args.start, min(len(ds), args.start + args.num_samples)):
        raw = ds.context(i)  # before FIM, which would fail less clearly on such ids
        if len(raw) and int(raw.max()) >= tok.vocab_size:
            raise ValueError(f"--tokenizer-model {tok.model_path}: sample {i} of {prefix} holds token id "
                             f"{int(raw.max())}, outside its vocabulary of {tok.vocab_size} (was the dataset "
                             "made with another tokenizer?)")
        epoch, out = sample(ds, fim, i)
        emit(stream, tok, i, epoch, out, args.json, split=fim.split_id is not None)


if __name__ == "__main__":
    sys.exit(main())
