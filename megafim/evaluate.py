"""AR, FIM and middle-only loss of a checkpoint on held-out ``.bin/.idx`` data (docs/evaluation.md).

    python -m megafim.evaluate --load runs/quickstart/checkpoints \\
        --data-path runs/quickstart/data/heldout_text_document [--seq-length 256] [--num-samples 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from megafim.data.tokenizer import Tokenizer
from megafim.eval.loss import evaluate_losses, format_table
from megafim.inference.loading import load_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megafim.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megafim save/checkpoint directory, or a Hugging Face directory")
    p.add_argument("--iteration", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--data-path", required=True, help="held-out dataset prefix (<prefix>.bin/.idx)")
    p.add_argument("--tokenizer-model", help="default: the checkpoint's own tokenizer")
    p.add_argument("--seq-length", type=int, help="default: the model's max_seq_len")
    p.add_argument("--num-samples", type=int, help="contexts to score (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234, help="seeds the FIM cut points")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_model(args.load, iteration=args.iteration, device=args.device)
        tok_path = args.tokenizer_model or loaded.tokenizer_path
        if tok_path is None:
            raise FileNotFoundError(f"{args.load}: no tokenizer found with the model; pass --tokenizer-model")
        tokenizer = Tokenizer.from_file(tok_path)
        seq_length = args.seq_length or loaded.model.config.max_seq_len
        report = evaluate_losses(loaded.model, tokenizer, args.data_path, seq_length=seq_length,
                                 num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed)
    except (OSError, ValueError, KeyError) as err:
        print(f"megafim.evaluate: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"checkpoint": str(loaded.source), "data_path": args.data_path, **report.as_dict()}))
    else:
        print(f"{loaded.source} on {args.data_path}: {report.samples} samples of {seq_length} tokens")
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
