#!/usr/bin/env python
"""Where the FIM transform's time goes when its cut words are new to the encoder's word cache.

    .venv/bin/python benchmarks/fim_cold_words.py [--contexts 8000] [--words 100000]

Two measurements on the corpus of benchmarks/fim_dataset.py (built there under --work-dir):
1. ``FimTransform.sample`` alone on contexts none of which it transformed before (first pass), then on
   the same contexts again (second pass: every cut word is cached), at FIM rate 0, 0.5 and 0.9.
2. ``Tokenizer.encode_batch`` on distinct cut words (a word of the corpus cut at a random character),
   first while new to the word cache, then again: the difference is what the BPE merge loop and the
   cache insert cost per uncached word.
Means of one pass each (CPU time). docs/fim.md has the numbers; writes benchmarks/results/fim_cold_words.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import fim_dataset  # noqa: E402  (the corpus and how the machine was shared)
from report import command, machine, write_json  # noqa: E402
from megafim.data.fim import FimConfig, FimTransform  # noqa: E402
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec  # noqa: E402
from megafim.data.tokenizer import Tokenizer  # noqa: E402


def per_call_us(fn, items) -> float:
    t = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - t) / len(items) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, default=8000, help="contexts for the FIM passes (1000 warm up)")
    p.add_argument("--words", type=int, default=100000, help="distinct cut words to encode")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "_work"))
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "fim_cold_words.json"))
    args = p.parse_args(argv)
    model, prefix = fim_dataset.prepare(Path(args.work_dir), 8000, 800)

    spec = GPTDatasetSpec(path_prefix=prefix, seq_length=2048, seed=1234, num_samples=args.contexts)
    plain = GPTDataset(spec)
    contexts = [plain._stored_context(i) for i in range(args.contexts)]  # the dataset's own uint16 tokens
    warm, timed = list(enumerate(contexts[:1000])), list(enumerate(contexts))[1000:]
    fim_rows = []
    for rate in (0.0, 0.5, 0.9):
        fim = FimTransform(FimConfig(rate=rate), Tokenizer.from_file(model))  # a fresh word cache
        call = lambda item: fim.sample(item[1], 7, 0, item[0])  # noqa: E731
        per_call_us(call, warm)
        first, second = per_call_us(call, timed), per_call_us(call, timed)
        fim_rows.append({"rate": rate, "first_pass_us": first, "second_pass_us": second})

    tok = Tokenizer.from_file(model)
    words = "".join(Path(f).read_text(encoding="utf-8", errors="replace")
                    for f in fim_dataset.stdlib_sources(800)[:200]).split()
    rng, cut = random.Random(0), set()
    while len(cut) < args.words:
        w = rng.choice(words)
        if len(w) > 1:
            c = rng.randint(1, len(w) - 1)
            cut.update((w[:c], w[c:]))
    cut = sorted(cut)[: args.words]
    rng.shuffle(cut)
    t = time.process_time()
    tok.encode_batch(cut)
    new_us = (time.process_time() - t) / len(cut) * 1e6
    t = time.process_time()
    tok.encode_batch(cut)
    cached_us = (time.process_time() - t) / len(cut) * 1e6
    mean_bytes = sum(len(w.encode()) for w in cut) / len(cut)

    print(f"FimTransform.sample on {len(timed)} contexts never transformed before (CPU us per call)")
    print(f"{'rate':>6}{'first pass':>12}{'second pass':>13}")
    for r in fim_rows:
        print(f"{r['rate']:>6}{r['first_pass_us']:>12.2f}{r['second_pass_us']:>13.2f}")
    print(f"encode_batch of {len(cut)} distinct cut words ({mean_bytes:.1f} bytes on average): "
          f"{new_us:.2f} us/word new, {cached_us:.2f} us/word cached, difference {new_us - cached_us:.2f}")
    result = {"benchmark": "fim_cold_words",
              "command": command(),
              "machine": machine(fim_dataset.MACHINE_NOTE), "fim_sample": fim_rows,
              "cut_words": {"count": len(cut), "mean_bytes": mean_bytes, "new_us": new_us, "cached_us": cached_us}}
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
