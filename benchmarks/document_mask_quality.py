"""Held-out AR and FIM loss of a small model trained with and without --reset-attention-mask.

The same corpus (the stdlib, held-out files chosen as examples/quickstart.py chooses them), tokenizer,
data, seeds and steps; only ``data.reset_attention_mask`` differs. Each run is scored on the held-out
files with ``python -m megafim.evaluate`` (full causal attention over its packed held-out contexts for
both settings, ``--no-reset-attention-mask``, so that the two are scored alike). A tiny model trained
for minutes on a CPU: the spread between seeds of one setting is printed beside the difference
between settings, read the latter against the former. The
JSON's ``mean_documents_per_context`` is the number of documents that end per context (end-of-text
tokens per ``seq_length + 1`` tokens): how many contexts the mask changes at all.

    python benchmarks/document_mask_quality.py [--max-files 400 --seq-length 256 --train-iters 200] \
        [--seeds 1234,1235]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command, machine, write_json  # noqa: E402

KINDS = ("ar", "fim_psm", "fim_spm", "middle_psm", "middle_spm")


def quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: list[str], env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"document_mask_quality: {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def prepare(out: Path, max_files: int, vocab: int) -> tuple[str, str, str, int]:
    """(tokenizer, train prefix, held-out prefix, training documents)."""
    train, held, n_train, _ = quickstart().write_corpus(out / "corpus", max_files)
    tok = out / "tok"
    run(["tools/train_tokenizer.py", "--input", str(train), "--json-keys", "text", "--vocab-size", str(vocab),
         "--output-prefix", str(tok)])
    for name, jsonl in (("train", train), ("heldout", held)):
        run(["tools/preprocess_data.py", "--input", str(jsonl), "--output-prefix", str(out / name),
             "--tokenizer-model", f"{tok}.model", "--json-keys", "text", "--append-eod", "--quiet"])
    return f"{tok}.model", str(out / "train_text_document"), str(out / "heldout_text_document"), n_train


def train_and_score(a, out: Path, tok: str, train: str, held: str, masked: bool, seed: int) -> dict:
    save = out / f"{'masked' if masked else 'plain'}_{seed}"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(a.threads))
    args = ["-m", "megafim.train", "--config", "examples/configs/tiny.yaml", "--data-path", train,
            "--tokenizer-model", tok, "--seq-length", str(a.seq_length), "--train-iters", str(a.train_iters),
            "--seed", str(seed), "--save", str(save), "--save-interval", str(a.train_iters),
            "--set", "logging.tensorboard=false", "--set", "logging.log_interval=50",
            "--set", "logging.progress_bar=off", "--zero-stage", "0"]
    if masked:
        args += ["--reset-attention-mask"]
    t0 = time.time()
    run(args, env)
    seconds = time.time() - t0
    report = json.loads(run(["-m", "megafim.evaluate", "--load", str(save), "--data-path", held, "--seq-length",
                             str(a.seq_length), "--num-samples", str(a.eval_samples), "--json", "--no-progress",
                             "--no-reset-attention-mask", "--no-reset-position-ids"],
                            env).strip().splitlines()[-1])
    return {"masked": masked, "seed": seed, "train_seconds": round(seconds, 1),
            **{k: report[k]["loss"] for k in KINDS}, "eval_samples": report["samples"]}


def summarize(rows: list[dict]) -> dict:
    """Per setting the mean over seeds and the range between seeds (None with one seed: unmeasured);
    only seeds that ran with both settings count."""
    seeds = {r["seed"] for r in rows if r["masked"]} & {r["seed"] for r in rows if not r["masked"]}
    out = {"seeds": sorted(seeds)}
    for masked in (False, True):
        sel = [r for r in rows if r["masked"] == masked and r["seed"] in seeds]
        out["masked" if masked else "plain"] = {
            k: {"mean": statistics.mean(r[k] for r in sel),
                "seed_range": max(r[k] for r in sel) - min(r[k] for r in sel) if len(sel) > 1 else None}
            for k in KINDS}
    out["masked_minus_plain"] = {k: out["masked"][k]["mean"] - out["plain"][k]["mean"] for k in KINDS}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "document_mask_quality")
    p.add_argument("--max-files", type=int, default=400)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--seeds", default="1234")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "document_mask_quality.json")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok, train, held, n_docs = prepare(a.out, a.max_files, a.vocab_size)
    from megafim.data.indexed import IndexedDataset

    ds = IndexedDataset(train)
    tokens = int(ds.sequence_lengths.sum())
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for masked in (False, True):
            rows.append(train_and_score(a, a.out, tok, train, held, masked, seed))
            r = rows[-1]
            print(f"{'masked' if masked else 'plain ':6} seed {seed}: " + "  ".join(f"{k} {r[k]:.3f}" for k in KINDS)
                  + f"  ({r['train_seconds']:.0f} s)", flush=True)
            if masked:  # after every pair: what ran so far survives a run cut short
                write_result(a, rows, n_docs, tokens, t0)


def write_result(a, rows: list[dict], n_docs: int, tokens: int, t0: float) -> None:
    summary = summarize(rows)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\n{'loss':12}{'plain':>10}{'masked':>10}{'diff':>10}{'seed range (plain/masked)':>28}")
    for k in KINDS:
        pl, ma = summary["plain"][k], summary["masked"][k]
        print(f"{k:12}{pl['mean']:10.3f}{ma['mean']:10.3f}{summary['masked_minus_plain'][k]:+10.3f}"
              f"{fmt(pl['seed_range']):>14} / {fmt(ma['seed_range'])}")
    write_json(a.json_out, {
        "command": command(),
        "machine": machine(note="2-core CPU shared with other jobs; losses do not depend on load"),
        "settings": {k: getattr(a, k) for k in ("max_files", "vocab_size", "seq_length", "train_iters", "seeds",
                                                "eval_samples")} | {"config": "examples/configs/tiny.yaml",
                                                                     "zero_stage": 0},
        "train_documents": n_docs, "train_tokens": tokens,
        "mean_documents_per_context": round(n_docs / (tokens / (a.seq_length + 1)), 3),
        "runs": rows, "summary": summary, "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
