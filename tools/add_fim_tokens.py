#!/usr/bin/env python3
"""Give a Hugging Face tokenizer the FIM tokens (and end-of-text) it lacks.

    python tools/add_fim_tokens.py --tokenizer hf/llama-3.2-1b --output tok/llama-3.2-1b-fim

Copies the tokenizer (``tokenizer.json`` or a transformers directory) to ``--output`` with
``<|fim_prefix|>``, ``<|fim_middle|>``, ``<|fim_suffix|>``, ``<|fim_pad|>`` added as special tokens
at the end of the vocabulary (other spellings with ``--fim-prefix-token`` ...); with ``--repo-tokens``
also ``<repo_name>`` and ``<file_sep>``, which ``tools/preprocess_data.py --group-by-key`` needs. A token
the tokenizer has already (the spelling given, or a known one) is not added and is listed as already
present. A model trained with the tokenizer before needs its embeddings resized to the new vocabulary
size, which the model import does (docs/tokenizer.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafim.data.tokenizer_hf import DEFAULT_FIM_SPELLINGS, add_fim_tokens  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a directory holding it")
    p.add_argument("--output", required=True, help="the directory to write")
    for name, spelling in DEFAULT_FIM_SPELLINGS.items():
        p.add_argument(f"--{name.replace('_', '-')}-token", default=spelling, help=f"default {spelling}")
    p.add_argument("--eod-token", default="<|endoftext|>",
                   help="added only when the tokenizer has neither it nor a known end-of-text")
    p.add_argument("--repo-tokens", action="store_true",
                   help="also add <repo_name> and <file_sep> (repository-level documents), when missing")
    args = p.parse_args(argv)
    spellings = {name: getattr(args, f"{name}_token") for name in (*DEFAULT_FIM_SPELLINGS, "eod")}
    try:
        path, added, present = add_fim_tokens(args.tokenizer, args.output, spellings,
                                              repo_tokens=args.repo_tokens)
    except (ValueError, OSError) as err:
        print(f"add_fim_tokens: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}: added {_listed(added) or 'nothing (it has them all)'}"
          + (f"; already present: {_listed(present)}" if present else ""))
    return 0


def _listed(tokens: dict[str, tuple[str, int]]) -> str:
    return ", ".join(f"{spelling}={token_id} ({name})" for name, (spelling, token_id) in tokens.items())


if __name__ == "__main__":
    sys.exit(main())
