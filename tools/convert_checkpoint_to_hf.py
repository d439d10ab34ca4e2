#!/usr/bin/env python3
"""Export a megafim checkpoint (any parallel layout, any ZeRO stage) as a Hugging Face Llama directory.

    python tools/convert_checkpoint_to_hf.py --load runs/quickstart/checkpoints --save hf/stdlib-tiny

The trunk plus head 0 load with ``transformers.AutoModelForCausalLM.from_pretrained`` as
``LlamaForCausalLM``; heads 1..n-1 go to ``mtp_heads.safetensors`` (docs/conversion.md). The tokenizer
goes along as ``tokenizer.json`` (same ids as megafim's) and ``megafim_tokenizer.model``; a Hugging Face
tokenizer also with ``megafim_special_tokens.json``, the spellings of its end-of-text and FIM tokens
(those the run named with ``data.special_tokens``, found again without the flags).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megafim.convert.hf_model import DTYPES, megafim_to_hf  # noqa: E402
from megafim.convert.hf_tokenizer import save_hf_tokenizer  # noqa: E402
from megafim.checkpoint import find, manifest  # noqa: E402
from megafim.checkpoint.format import HF_SPECIAL_TOKENS_FILE, HF_TOKENIZER_FILE  # noqa: E402
from megafim.checkpoint.weights import read_model_state, special_tokens, tokenizer_path  # noqa: E402
from megafim.inference.loading import load_checkpoint_tokenizer  # noqa: E402


def clear_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory, or with ``overwrite`` remove an earlier export's weight
    files, so that ``from_pretrained`` can never pick up a stale shard beside the new ones."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"{out}: not empty; choose a new directory or pass --overwrite to replace an "
                         "earlier export there")
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        stale.unlink()


def write_special_tokens(tokenizer, out: Path) -> None:
    """A Hugging Face tokenizer's end-of-text and FIM spellings, for megafim's tools to load
    ``megafim_tokenizer.model`` with (a sentencepiece model's special pieces are fixed: no file)."""
    if tokenizer.tokenizer_type == "HuggingFaceTokenizer":
        named = {name: piece for name, piece in tokenizer.special_pieces.items() if piece}
        (out / HF_SPECIAL_TOKENS_FILE).write_text(json.dumps(named, indent=2, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="save directory (its 'latest' checkpoint) or a step_* directory")
    p.add_argument("--save", required=True, help="output directory")
    p.add_argument("--iteration", type=int, help="the step to export (default: the latest)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokenizer-model", help="default: the checkpoint's own tokenizer")
    p.add_argument("--max-shard-size-gb", type=float, default=2.0)
    p.add_argument("--overwrite", action="store_true",
                   help="export into a non-empty --save, removing its earlier *.safetensors first")
    args = p.parse_args(argv)
    try:
        ckpt = find.resolve(args.load, args.iteration)
        manifest.verify(ckpt, only=manifest.files_under(ckpt, "model/"))
        state, config = read_model_state(ckpt)
        tok_path = args.tokenizer_model or tokenizer_path(ckpt)
        clear_output(Path(args.save), args.overwrite)
        tokenizer = load_checkpoint_tokenizer(tok_path, special_tokens(ckpt)) if tok_path else None
        out = megafim_to_hf(state, config, args.save, dtype=args.dtype,
                            eos_token_id=tokenizer.eod if tokenizer else None,
                            max_shard_bytes=int(args.max_shard_size_gb * (1 << 30)))
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, out, model_max_length=config.max_seq_len)
            shutil.copyfile(tokenizer.model_path, out / HF_TOKENIZER_FILE)
            write_special_tokens(tokenizer, out)
    except (OSError, ValueError, KeyError) as err:
        print(f"convert_checkpoint_to_hf: {err}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} ({config.n_future} head(s)) to {out}" + ("" if tokenizer else " (no tokenizer found)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
