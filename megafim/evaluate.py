"""AR, FIM and middle-only loss of a checkpoint on held-out ``.bin/.idx`` data (docs/evaluation.md).

    python -m megafim.evaluate --load runs/quickstart/checkpoints \\
        --data-path runs/quickstart/data/heldout_text_document [--seq-length 256] [--num-samples 64] [--json]

By default the first 256 held-out contexts are scored (--num-samples 0: all of them). A progress bar
goes to stderr when it is a terminal (--no-progress turns it off). A checkpoint trained with
--reset-attention-mask / --reset-position-ids is scored with them (its config.yaml says so);
--[no-]reset-attention-mask and --[no-]reset-position-ids override that.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from megafim.checkpoint.weights import document_settings
from megafim.eval.loss import DocumentMask, evaluate_losses, format_table
from megafim.inference.loading import load_model

DEFAULT_NUM_SAMPLES = 256
"""Held-out contexts scored by default: a bounded run time (each is scored three times: AR, PSM, SPM), where scoring
every context of a large held-out set can take many minutes on a CPU. The report says how many were scored."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megafim.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megafim save/checkpoint directory, or a Hugging Face directory")
    p.add_argument("--iteration", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--data-path", required=True, help="held-out dataset prefix (<prefix>.bin/.idx)")
    p.add_argument("--tokenizer-model", help="default: the checkpoint's own tokenizer")
    p.add_argument("--seq-length", type=int, help="default: the model's max_seq_len")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                   help=f"held-out contexts to score, the first ones (default: {DEFAULT_NUM_SAMPLES}; 0: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234, help="seeds the FIM cut points")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reset-attention-mask", action=argparse.BooleanOptionalAction,
                   help="attend only within each document, as training with this flag did (default: what the "
                        "checkpoint's run used; off for a Hugging Face directory)")
    p.add_argument("--reset-position-ids", action=argparse.BooleanOptionalAction,
                   help="restart rotary positions at each document (default: what the checkpoint's run used)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    args = p.parse_args(argv)
    if args.num_samples < 0:
        p.error(f"--num-samples must be >= 0 (0: all), got {args.num_samples}")
    return args


class _ProgressBar:
    """``evaluate_losses``'s progress callback as a tqdm bar on stderr, made at the first call (when the total is known)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc="evaluate", unit="ctx", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _document_mask(args: argparse.Namespace, loaded) -> DocumentMask:
    """The flags given, else the checkpoint's run's settings (a Hugging Face directory has none)."""
    saved = document_settings(loaded.source) if loaded.kind == "megafim" else {}
    given = {name: getattr(args, name) for name in ("reset_attention_mask", "reset_position_ids")}
    return DocumentMask(**{name: saved.get(name, False) if flag is None else flag for name, flag in given.items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_model(args.load, iteration=args.iteration, device=args.device)
        tokenizer = loaded.load_tokenizer(args.tokenizer_model)
        seq_length = args.seq_length or loaded.model.config.max_seq_len
        document_mask = _document_mask(args, loaded)
        bar = _ProgressBar(enabled=not args.no_progress and sys.stderr.isatty())
        try:
            report = evaluate_losses(loaded.model, tokenizer, args.data_path, seq_length=seq_length,
                                     num_samples=args.num_samples or None, batch_size=args.batch_size,
                                     seed=args.seed, progress=bar, document_mask=document_mask)
        finally:
            bar.close()
    except (OSError, ValueError, KeyError) as err:
        print(f"megafim.evaluate: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"checkpoint": str(loaded.source), "data_path": args.data_path, **report.as_dict()}))
    else:
        flags = [f"--{name.replace('_', '-')}" for name, on in vars(document_mask).items() if on]
        print(f"{loaded.source} on {args.data_path}: {report.samples} samples of {seq_length} tokens"
              + (f", documents scored alone ({' '.join(flags)})" if flags else ""))
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
