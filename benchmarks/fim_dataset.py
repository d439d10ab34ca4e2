#!/usr/bin/env python
"""Samples/s of one data-loading worker with context-level FIM, against FIM off and a bigcode-style
decode-cut-re-encode baseline, side by side in one run (docs/fim.md has the numbers).

    .venv/bin/python benchmarks/fim_dataset.py [--seq-length 2048] [--samples 250] [--repeats 28]

The corpus is the standard library's own source: a tokenizer (tools/train_tokenizer.py) and a
``.bin/.idx`` dataset are built once under ``--work-dir``. Every configuration reads the same samples
through ``GPTDataset.__getitem__``; only the FIM callable differs. Configurations are interleaved
within each repeat so that load from other processes on a shared machine hits them alike; times are
medians over repeats, ratios medians over repeats of the ratio within a repeat (many short repeats:
a burst of load spoils a few of them, not the median). Writes benchmarks/results/fim_dataset.json.

As in training, no sample is read twice: the dataset spans several epochs (each with its own FIM cut
points), a warm-up reads the first ``--warmup`` samples, and every repeat reads samples of its own.
So the encoder's word cache holds what a worker has seen before, not the very words being timed;
``--same-samples`` re-reads one set in every repeat instead (the cache then holds every cut word).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megafim.data.fim import FimConfig, FimTransform  # noqa: E402
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec  # noqa: E402
from megafim.data.indexed import IndexedDatasetBuilder  # noqa: E402
from megafim.data.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from report import command, machine, shown_path, write_json  # noqa: E402

MACHINE_NOTE = "CPU shared with other processes; medians of interleaved repeats"


# ------------------------------------------------------------------------------------------------
# The baseline: what bigcode-project/Megatron-LM's GPTDataset does (megatron/data/gpt_dataset.py,
# `permute` and its caller), written here plainly: one numpy RandomState per dataset, each non-empty
# end-of-text-separated segment is decoded to text, cut at two random character positions, and the
# three parts are encoded again; the joined context is cut or padded at its end.
# ------------------------------------------------------------------------------------------------


@dataclass
class BaselineResult:
    tokens: np.ndarray
    loss_mask: np.ndarray
    middle_mask: np.ndarray


class BigcodeStyleFim:
    def __init__(self, tokenizer: Tokenizer, rate: float, spm_rate: float, seed: int) -> None:
        self.tok, self.rate, self.spm_rate = tokenizer, rate, spm_rate
        self.rng = np.random.RandomState(seed)  # stateful: depends on the order samples are read

    def _permute(self, segment: np.ndarray) -> np.ndarray:
        if not self.rng.binomial(1, self.rate):
            return segment
        text = self.tok.decode(segment)
        cuts = sorted(self.rng.randint(low=0, high=len(text) + 1, size=2))
        prefix, middle, suffix = (np.asarray(self.tok.encode(part), dtype=np.int64)
                                  for part in (text[:cuts[0]], text[cuts[0]:cuts[1]], text[cuts[1]:]))
        t = self.tok
        if self.rng.binomial(1, self.spm_rate):
            parts = [[t.fim_prefix, t.fim_suffix], suffix, [t.fim_middle], prefix, middle]
        else:
            parts = [[t.fim_prefix], prefix, [t.fim_suffix], suffix, [t.fim_middle], middle]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    def __call__(self, context: np.ndarray, *, seed: int, epoch: int, index: int) -> BaselineResult:
        eod, n = self.tok.eod, len(context)
        breaks = np.flatnonzero(context == eod)
        pieces, start = [], 0
        for loc in breaks:
            if loc > start:
                pieces.append(self._permute(context[start:loc]))
            pieces.append(np.asarray([eod], dtype=np.int64))
            start = loc + 1
        if start < n:
            pieces.append(self._permute(context[start:]))
        out = np.concatenate(pieces)[:n]
        pad = n - len(out)
        out = np.concatenate([out, np.full(pad, self.tok.fim_pad, dtype=np.int64)])
        loss = np.ones(n, dtype=np.float32)
        loss[n - pad:] = 0
        return BaselineResult(out, loss, np.zeros(n, dtype=bool))


# ------------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------------


def stdlib_sources(limit: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
    return files[:: max(1, len(files) // limit)][:limit]


def prepare(work: Path, vocab_size: int, n_files: int, tokenizer: str | None = None) -> tuple[str, str]:
    """A tokenizer (``tokenizer``, or one trained here) and a dataset (one document per file,
    end-of-text appended), built once."""
    work.mkdir(parents=True, exist_ok=True)
    model, prefix = work / f"tok{vocab_size}.model", work / f"stdlib{n_files}_v{vocab_size}"
    if tokenizer:
        model, prefix = Path(tokenizer), work / f"stdlib{n_files}_{Path(tokenizer).name}"
    files = stdlib_sources(n_files)
    if not model.exists():
        spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "tools" / "train_tokenizer.py")
        tool = importlib.util.module_from_spec(spec)
        sys.modules["train_tokenizer"] = tool
        spec.loader.exec_module(tool)
        config = tool.TrainConfig(inputs=[str(p) for p in files[::4]], vocab_size=vocab_size,
                                  output_prefix=str(work / f"tok{vocab_size}"), threads=2)
        tool.train(config, log=lambda *_: None)
    if not Path(f"{prefix}.idx").exists():
        tok = load_tokenizer(model)
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        with IndexedDatasetBuilder(prefix, dtype=np.uint16 if tok.vocab_size < 65535 else np.int32) as b:
            for ids in tok.encode_batch(texts):
                b.add_document(np.append(ids, tok.eod))
    return str(model), str(prefix)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def time_samples(ds: GPTDataset, indices: list[int]) -> tuple[float, float]:
    """(wall, CPU) seconds per sample. CPU time is what one worker with a core of its own spends; on a
    shared machine it is far less noisy than wall time, so the ratios are taken from it."""
    w0, c0 = time.perf_counter(), time.process_time()
    for i in indices:
        ds[i]
    return (time.perf_counter() - w0) / len(indices), (time.process_time() - c0) / len(indices)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=250, help="samples read per configuration and repeat")
    p.add_argument("--repeats", type=int, default=28)
    p.add_argument("--warmup", type=int, default=1000, help="samples read before timing (page and word caches)")
    p.add_argument("--same-samples", action="store_true",
                   help="re-read the same samples in every repeat (warm word cache; the old measure)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--files", type=int, default=800, help="standard-library files in the dataset")
    p.add_argument("--tokenizer", help="a tokenizer to use instead of training one (e.g. a Hugging Face "
                   "tokenizer directory; benchmarks/preprocess_hf.py makes a Llama-3-style one)")
    p.add_argument("--no-baseline", action="store_true",
                   help="leave the bigcode-style rows out: FIM off and on only (the baseline, run between "
                        "them, evicts the FIM encoder's tables from the caches; docs/fim.md)")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "_work"))
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "fim_dataset.json"))
    args = p.parse_args(argv)

    model, prefix = prepare(Path(args.work_dir), args.vocab_size, args.files, args.tokenizer)
    tok = load_tokenizer(model)
    fresh = 1 if args.same_samples else args.repeats
    spec = GPTDatasetSpec(path_prefix=prefix, seq_length=args.seq_length, seed=1234,
                          num_samples=args.warmup + fresh * args.samples)
    configs = {"off": None}
    for rate in (0.5, 0.9):
        # A tokenizer each: its encoder's word cache must not hold the words another config just cut.
        configs[f"fim {rate}"] = FimTransform(FimConfig(rate=rate), load_tokenizer(model))
        if not args.no_baseline:
            configs[f"bigcode {rate}"] = BigcodeStyleFim(load_tokenizer(model), rate, 0.5, seed=1234)
    datasets = {name: GPTDataset(spec, fim=fim) for name, fim in configs.items()}
    n, warm = args.samples, list(range(args.warmup))
    for ds in datasets.values():  # the page cache and the encoders' word caches, alike for all
        time_samples(ds, warm)
    wall: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeats):
        first = args.warmup + (0 if args.same_samples else r * n)
        indices = list(range(first, first + n))
        for name, ds in datasets.items():
            w, c = time_samples(ds, indices)
            wall[name].append(w)
            cpu[name].append(c)
    med = {name: statistics.median(v) for name, v in cpu.items()}
    med_wall = {name: statistics.median(v) for name, v in wall.items()}

    def ratio(t: dict[str, list[float]], a: str, b: str) -> float:
        """Median over repeats of a's time over b's in the same repeat: the two ran back to back, so a
        burst of load from other processes that spans a repeat cancels out of its ratio."""
        return statistics.median(x / y for x, y in zip(t[a], t[b]))

    rows = []
    for name in configs:
        row = {"config": name, "cpu_us_per_sample": med[name] * 1e6, "samples_per_cpu_s": 1 / med[name],
               "vs_off": ratio(cpu, name, "off"), "wall_us_per_sample": med_wall[name] * 1e6,
               "wall_vs_off": ratio(wall, name, "off")}
        if name.startswith("fim") and not args.no_baseline:
            row["baseline_over_fim"] = ratio(cpu, name.replace("fim", "bigcode"), name)
            row["wall_baseline_over_fim"] = ratio(wall, name.replace("fim", "bigcode"), name)
        rows.append(row)
    print(f"seq_length {args.seq_length}, {n} samples x {args.repeats} repeats "
          f"({'the same samples each repeat' if args.same_samples else 'new samples each repeat'}), "
          f"{args.warmup} warm-up samples, tokenizer {tok.backend}; CPU time (wall time in brackets): "
          f"medians of per-sample times, ratios are medians of per-repeat ratios")
    print(f"{'config':<14}{'us/sample':>18}{'samples/s':>10}{'x off':>14}{'bigcode/ours':>16}")
    for r in rows:
        extra = (f"{r['baseline_over_fim']:>8.1f} [{r['wall_baseline_over_fim']:4.1f}]"
                 if "baseline_over_fim" in r else "")
        print(f"{r['config']:<14}{r['cpu_us_per_sample']:>9.1f} [{r['wall_us_per_sample']:6.1f}]"
              f"{r['samples_per_cpu_s']:>10.0f}{r['vs_off']:>7.2f} [{r['wall_vs_off']:4.2f}]{extra}")
    result = {"benchmark": "fim_dataset", "command": command(),
              "machine": machine(MACHINE_NOTE), "seq_length": args.seq_length, "samples": n,
              "repeats": args.repeats,
              "warmup": args.warmup, "same_samples": args.same_samples, "baseline": not args.no_baseline,
              "vocab_size": tok.vocab_size, "tokenizer": shown_path(model), "tokenizer_backend": tok.backend, "rows": rows,
              "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
              "raw_cpu_seconds_per_sample": cpu,
              "raw_wall_seconds_per_sample": wall}
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
