#!/usr/bin/env python
"""Preprocessing with a Hugging Face byte-level BPE tokenizer: megafim against Megatron-LM's
``tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer``, same tokenizer, same workers.

    python benchmarks/preprocess_hf.py [--workers 2] [--repeats 3] [--vocab-size 16384]

The corpus is the standard library's *.py files as JSONL (benchmarks/preprocess.py's). The tokenizer
is a Llama-3-style byte-level BPE trained here with the ``tokenizers`` library on the same files, FIM
tokens added (tools/add_fim_tokens.py), written as a transformers directory that both tools load.
Megatron-LM comes from ``--megatron-lm`` or ``$MEGATRON_LM`` (a checkout, see benchmarks/README.md;
without one only megafim is measured). The tools run alternately; medians are
reported, with docs/s, peak RSS over the process tree, and whether the ids agree document by document.
Writes benchmarks/results/preprocess_hf.json.
"""

from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from preprocess import (checkout_version, compare_outputs, make_corpus, medians, megatron_checkout,  # noqa: E402
                        one_run, ours_cmd, print_table, shared_machine)
from report import command, shown_command, write_json  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/megafim-bench-preprocess-hf")
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                   help="a Megatron-LM checkout (default: $MEGATRON_LM; none: only megafim is measured)")
    p.add_argument("--megatron-pythonpath", default="",
                   help="extra PYTHONPATH entries for Megatron-LM's tool (it imports `six`, which megafim does not need)")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "preprocess_hf.json"))
    return p.parse_args()


def ensure_hf_tokenizer(workdir: Path, vocab_size: int, corpus: Path) -> Path:
    """A Llama-3-style tokenizer with FIM tokens, as a transformers directory (tokenizer_config.json
    names its end-of-text, which Megatron-LM appends for --append-eod)."""
    out = workdir / f"llama3_style_{vocab_size}"
    if (out / "tokenizer_config.json").is_file():
        return out
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from megafim.convert.hf_tokenizer import save_hf_tokenizer
    from megafim.data.tokenizer import load_tokenizer
    from megafim.data.tokenizer_hf import SPACE_SAFE_REGEXES, add_fim_tokens

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPACE_SAFE_REGEXES[1]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end_of_text|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus, encoding="utf-8") as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    tok.save(str(workdir / "plain.json"))
    add_fim_tokens(workdir / "plain.json", out)
    save_hf_tokenizer(load_tokenizer(out), out)
    return out


def megatron_hf_cmd(mdir: Path, inp: Path, prefix: Path, model: Path, workers: int) -> list[str]:
    return [sys.executable, str(mdir / "tools" / "preprocess_data.py"), "--input", str(inp), "--output-prefix",
            str(prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(model),
            "--workers", str(workers), "--append-eod", "--log-interval", "200"]


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    mdir = megatron_checkout(args.megatron_lm)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    small, _, n_docs = make_corpus(work, 1)
    model = ensure_hf_tokenizer(work, args.vocab_size, small)
    from megafim.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    print(f"corpus: {small} ({small.stat().st_size / 2**20:.1f} MiB, {n_docs} documents); tokenizer {model} "
          f"(vocab {tok.vocab_size}); workers {args.workers}; {args.repeats} alternating runs each", flush=True)
    commands = {"megafim": ours_cmd(small, work / "ours", model, args.workers)}
    env = None
    if mdir is not None:
        commands["megatron-lm"] = megatron_hf_cmd(mdir, small, work / "megatron", model, args.workers)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(mdir), args.megatron_pythonpath])),
                   PYTHONWARNINGS="ignore")
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for i in range(args.repeats):
        for name in runs:
            prefix = work / ("ours" if name == "megafim" else "megatron")
            runs[name].append(one_run(name, commands[name], prefix, small.stat().st_size,
                                      None if name == "megafim" else env))
        print(f"  run {i + 1}: " + ", ".join(f"{t} {r[-1]['wall_s']:.1f} s" for t, r in runs.items()), flush=True)
    med = {k: medians(v) for k, v in runs.items()}
    print_table(f"stdlib JSONL, Hugging Face tokenizer, {args.workers} workers, median of {args.repeats}", med)
    result = {"benchmark": "preprocess_hf", "machine": shared_machine(load_at_start),
              "command": command(),
              "megatron_lm": {"dir": str(mdir), "version": checkout_version(mdir)} if mdir else None,
              "corpus": {"path": str(small), "bytes": small.stat().st_size, "documents": n_docs},
              "tokenizer": {"path": str(model), "vocab_size": tok.vocab_size, "eod": tok.eod},
              "commands": {k: shown_command(v) for k, v in commands.items()}}
    if mdir is not None:
        agreement = compare_outputs(str(work / "ours_text_document"), str(work / "megatron_text_document"),
                                    tok.eod, tok.eod)
        ratios = {k: med["megafim"][k] / med["megatron-lm"][k]
                  for k in ("docs_per_s", "tokens_per_s", "mb_per_s", "steady_docs_per_s", "tokens_per_cpu_s")}
        ratios["peak_rss"] = med["megafim"]["peak_rss_mib"] / med["megatron-lm"]["peak_rss_mib"]
        print("\nmegafim / megatron-lm: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        print(f"output agreement: {agreement}")
        result.update(ratios_megafim_over_megatron=ratios, output_agreement=agreement)
    for rows in runs.values():
        for r in rows:
            r.pop("stderr", None)
    result.update(runs=runs, medians=med)
    write_json(args.output, result)


if __name__ == "__main__":
    main()
