#!/usr/bin/env python3
"""Join ``.bin/.idx`` datasets (shards) into one, streaming: memory does not grow with their size.

    python tools/merge_datasets.py --input data/shard_0_text_document data/shard_1_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

``--input`` takes dataset prefixes (documents are kept in the order given) or one directory (every
pair in it, sorted by name). Each input is validated in full and their token dtypes must agree; the
output appears only when complete. See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafim.data.indexed import find_datasets, merge_datasets, resolve_dataset_prefix  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, or one directory of them")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    args = p.parse_args(argv)
    try:
        if len(args.input) == 1 and os.path.isdir(args.input[0]):
            prefixes = find_datasets(args.input[0])
        else:
            prefixes = [resolve_dataset_prefix(s, "--input") for s in args.input]
        start = time.perf_counter()
        merged = merge_datasets(prefixes, args.output_prefix)
    except (ValueError, OSError, RuntimeError) as err:  # RuntimeError: the C++ writer's I/O errors, a lock
        print(f"merge_datasets: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}: {merged.num_documents:,} documents, "
          f"{len(merged):,} sequences, {merged.num_tokens:,} tokens ({merged.dtype}) in "
          f"{time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
