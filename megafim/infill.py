"""Fill in the middle of a file with a megafim checkpoint or an exported Hugging Face model.

    python -m megafim.infill --checkpoint runs/quickstart/checkpoints \\
        --prefix-file before.py --suffix-file after.py [--mode spm] [--num-samples 3 --temperature 0.8]

Prints the generated middle(s); with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megafim.inference.infill import MODES, infill
from megafim.inference.loading import load_model
from megafim.inference.sampling import SamplingConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megafim.infill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="megafim save/checkpoint directory, or a Hugging Face directory")
    p.add_argument("--iteration", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--prefix-file", type=Path, required=True)
    p.add_argument("--suffix-file", type=Path, required=True)
    p.add_argument("--tokenizer-model", help="default: the checkpoint's own tokenizer")
    p.add_argument("--mode", choices=MODES, default="psm")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prefix = args.prefix_file.read_text(encoding="utf-8")
        suffix = args.suffix_file.read_text(encoding="utf-8")
        loaded = load_model(args.checkpoint, iteration=args.iteration, device=args.device)
        tokenizer = loaded.load_tokenizer(args.tokenizer_model)
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed)
    except (OSError, ValueError, KeyError) as err:
        print(f"megafim.infill: {err}", file=sys.stderr)
        return 2
    middles = infill(loaded.model, tokenizer, prefix, suffix, mode=args.mode, sampling=sampling,
                     num_samples=args.num_samples)
    if args.json:
        print(json.dumps({"checkpoint": str(loaded.source), "mode": args.mode, "middles": middles}))
    else:
        for i, middle in enumerate(middles):
            if len(middles) > 1:
                print(f"--- sample {i}")
            print(middle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
