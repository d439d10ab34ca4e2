"""Encoding speed: megafim's C++ BPE encoder vs sentencepiece, on the Python standard library.

    python benchmarks/tokenizer_encode.py [--model tok.model] [--vocab-size 8192] [--repeats 5]
                                         [--out benchmarks/results/tokenizer_encode.json]

Encodes every UTF-8 *.py file of the stdlib (site-packages excluded) as one batch, with 1 and 2
threads: ``Tokenizer.encode_batch`` (C++, GIL released, per-word cache) against sentencepiece's
``encode(texts, num_threads=...)``. Without --model, a tokenizer is first trained on the same corpus
with tools/train_tokenizer.py. Checks that both give identical ids first, then reports the median
tokens/s of the repeats (wall clock and CPU time) and the ratios. "cold" runs use a freshly loaded
tokenizer each repeat, so its word cache starts empty; the other megafim rows reuse one tokenizer, as a
long preprocessing job does. The machine may be shared: medians of repeats, and the load is recorded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sentencepiece as spm  # noqa: E402

from megafim.data.tokenizer import Tokenizer  # noqa: E402
from report import command, machine, write_json  # noqa: E402


def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def measure(fn, repeats: int) -> dict:
    """Run fn() `repeats` times; median wall and CPU seconds, and the token count it returns."""
    walls, cpus, tokens = [], [], 0
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        tokens = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"tokens": tokens, "wall_s": walls, "cpu_s": cpus,
            "median_wall_s": statistics.median(walls), "median_cpu_s": statistics.median(cpus)}


def ensure_model(args) -> str:
    if args.model:
        return args.model
    out = Path(tempfile.mkdtemp(prefix="megafim_tok_bench_")) / "stdlib"
    stdlib = sysconfig.get_paths()["stdlib"]
    cmd = [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", stdlib,
           "--vocab-size", str(args.vocab_size), "--output-prefix", str(out)]
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return f"{out}.model"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .model file (default: train one on the stdlib first)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokenizer_encode.json")
    args = parser.parse_args()
    model = ensure_model(args)
    texts = stdlib_texts()
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ours = Tokenizer.from_file(model)
    if ours.backend != "native":
        sys.exit("benchmarks/tokenizer_encode.py: the C++ encoder is not built (python setup.py build_ext --inplace)")
    sp = spm.SentencePieceProcessor(model_file=model)

    # Correctness first: identical ids (texts with a literal U+2581 differ by design, docs/tokenizer.md).
    plain = [t for t in texts if "\u2581" not in t]
    mismatched = sum(a.tolist() != b for a, b in zip(ours.encode_batch(plain, 2), sp.encode(plain, num_threads=2)))
    if mismatched:
        print(f"FAIL: {mismatched} of {len(plain)} files encode differently from sentencepiece")
        return 1

    load_before = os.getloadavg()
    runs = {}
    for threads in (1, 2):
        runs[f"sentencepiece {threads}t"] = measure(
            lambda: sum(len(x) for x in sp.encode(texts, num_threads=threads)), args.repeats)
        runs[f"megafim {threads}t"] = measure(
            lambda: sum(len(x) for x in ours.encode_batch(texts, threads)), args.repeats)
    runs["megafim 1t cold"] = measure(
        lambda: sum(len(x) for x in Tokenizer.from_file(model).encode_batch(texts, 1)), args.repeats)
    load_after = os.getloadavg()

    rows = {}
    for name, r in runs.items():
        rows[name] = {**r, "tokens_per_s": r["tokens"] / r["median_wall_s"],
                      "tokens_per_cpu_s": r["tokens"] / r["median_cpu_s"]}
    for name, row in rows.items():
        base = rows[f"sentencepiece {name.split()[1]}"]
        row["speedup_vs_sentencepiece"] = row["tokens_per_s"] / base["tokens_per_s"]
    print(f"\n{len(texts)} files, {n_bytes / 1e6:.1f} MB, {rows['megafim 1t']['tokens']:,} tokens, "
          f"vocab {ours.vocab_size}; median of {args.repeats}; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'encoder':<22}{'Mtok/s (wall)':>15}{'Mtok/s (CPU)':>14}{'x sentencepiece':>17}")
    for name, row in rows.items():
        print(f"{name:<22}{row['tokens_per_s'] / 1e6:>15.2f}{row['tokens_per_cpu_s'] / 1e6:>14.2f}"
              f"{row['speedup_vs_sentencepiece']:>17.2f}")
    result = {
        "benchmark": "tokenizer_encode", "command": command(),
        "machine": machine(sentencepiece=spm.__version__),
        "load_average_before": load_before, "load_average_after": load_after,
        "corpus": {"files": len(texts), "bytes": n_bytes}, "model": model, "vocab_size": ours.vocab_size,
        "repeats": args.repeats, "identical_ids": True, "results": rows,
        "note": "CPU shared with other jobs while measuring; medians of repeats. 'cold': a new tokenizer "
                "(empty word cache) per repeat.",
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
