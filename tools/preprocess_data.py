#!/usr/bin/env python3
"""Tokenize a corpus into Megatron-LM ``.bin/.idx`` datasets (Megatron-LM's flag names).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-model tok/stdlib.model --json-keys text --append-eod --workers 2

``--input`` takes JSON-lines files, or source files / directories / globs (one document per file).
Writes ``<output-prefix>_<key>_document.bin/.idx`` per key. Bad documents (malformed JSON, a missing
key, a non-string value, invalid UTF-8, an empty text) are skipped and listed with ``file:line`` in
the closing summary; ``--strict`` stops at the first. ``--group-by-key repo --path-key path`` makes
each repository one document, ``<repo_name>NAME<file_sep>PATH\nCONTENT<file_sep>...``, files sorted by
path. Any error (a bad flag or input, every document
skipped, an unwritable output) is one line on stderr and exit code 2, with nothing written.
See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafim.data.preprocess import PreprocessConfig, format_summary, run_preprocess  # noqa: E402
from megafim.data.tokenizer_hf import NoEndOfTextError  # noqa: E402


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``), unwound like Ctrl-C so that the temporary outputs are removed too."""


def _on_sigterm(*_) -> None:
    raise Terminated()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s), or source files, directories or globs (one document per file)")
    p.add_argument("--output-prefix", required=True, help="outputs: <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-model", required=True,
                   help="a model from tools/train_tokenizer.py, or a Hugging Face tokenizer.json / directory")
    p.add_argument("--tokenizer-type", choices=["GPTSentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="default: from --tokenizer-model (a JSON file or a directory is a Hugging Face one)")
    p.add_argument("--special-token", action="append", default=[], metavar="NAME=SPELLING",
                   help="a Hugging Face tokenizer's eod / fim_prefix / fim_middle / fim_suffix / fim_pad token, "
                        "when not a known spelling (repeatable)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)")
    p.add_argument("--group-by-key", metavar="KEY",
                   help="JSONL: records with the same value under KEY (e.g. repo) become one document, "
                        "<repo_name>NAME<file_sep>PATH\\nCONTENT<file_sep>..., files sorted by path; needs "
                        "--path-key and a tokenizer with <repo_name> and <file_sep>")
    p.add_argument("--path-key", metavar="KEY", help="with --group-by-key: the key of each file's path (e.g. path)")
    p.add_argument("--max-group-bytes", type=int, default=256 * 2**20, metavar="N",
                   help="with --group-by-key: at most N bytes of text held for repositories not yet written "
                        "(default 256 MiB); a bigger repository is split into several documents, each starting "
                        "with <repo_name>; input sorted by repository keeps the others whole")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document id to each document")
    p.add_argument("--workers", type=int, default=1, help="encoding threads (default 1)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad document instead of skipping it")
    p.add_argument("--log-interval", type=float, default=0.5, help="seconds between progress updates")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", help="also write the closing summary to this JSON file")
    return p.parse_args(argv)


def parse_special_tokens(items: list[str]) -> dict[str, str]:
    """``["eod=<|eot_id|>"]`` -> ``{"eod": "<|eot_id|>"}``; a malformed item is a ValueError."""
    out = {}
    for item in items:
        name, sep, spelling = item.partition("=")
        if not sep or not spelling:
            raise ValueError(f"--special-token {item!r}: expected NAME=SPELLING, e.g. eod='<|eot_id|>'")
        out[name] = spelling
    return out


def error_text(err: Exception) -> str:
    """``err``'s message; a tokenizer without end-of-text is told to name it with ``--special-token``."""
    return err.naming("--special-token eod=SPELLING") if isinstance(err, NoEndOfTextError) else str(err)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        config = PreprocessConfig(inputs=args.input, output_prefix=args.output_prefix,
                                  tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type,
                                  special_tokens=parse_special_tokens(args.special_token),
                                  json_keys=args.json_keys, group_by_key=args.group_by_key,
                                  path_key=args.path_key, max_group_bytes=args.max_group_bytes,
                                  append_eod=args.append_eod, workers=args.workers, strict=args.strict,
                                  progress=not args.quiet, log_interval=args.log_interval)
        summary = run_preprocess(config)
    except (ValueError, OSError, RuntimeError) as err:  # RuntimeError: the C++ writer's I/O errors
        print(f"preprocess_data: error: {' '.join(error_text(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print("preprocess_data: interrupted; no outputs were written", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    print(format_summary(summary), file=sys.stderr)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
