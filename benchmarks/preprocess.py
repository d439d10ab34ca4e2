#!/usr/bin/env python3
"""Preprocessing throughput and memory: megafim's tools/preprocess_data.py vs Megatron-LM's, side by side.

    python benchmarks/preprocess.py            # writes benchmarks/results/preprocess.json

Both tools get the same input (the Python standard library's *.py files as JSONL, one file per line),
the same sentencepiece model (Megatron-LM: --tokenizer-type SentencePieceTokenizer), --workers 2 and
--append-eod. Runs alternate between the tools (ours, theirs, ours, ...) so that both see the same
machine load, and each number is the median of --repeats runs. Reported per tool: documents/s,
tokens/s, input MB/s, peak RSS of the whole process tree (sampled every 20 ms; Megatron-LM runs a
pool of worker processes) and CPU seconds. Megatron-LM's wall time includes its start-up (importing
torch and megatron.training); its own log also gives its steady-state rate, reported apart.
Then megafim runs on the corpus repeated --scale times: its peak memory should not grow.

Megatron-LM is a checkout given by --megatron-lm DIR or the MEGATRON_LM environment variable
(nothing of it is committed here); the numbers in docs/preprocessing.md used release core_v0.16.1,
the one matching the installed megatron-core:

    git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.16.1
    MEGATRON_LM=$PWD/Megatron-LM python benchmarks/preprocess.py

Its script also needs the pure-Python package ``six``. Without a checkout the Megatron-LM rows are
skipped (the script says so) and megafim is measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megafim.data.indexed import IndexedDataset  # noqa: E402
from megafim.data.preprocess import resolve_inputs  # noqa: E402
from report import command, machine, shown_command, write_json  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/megafim-bench-preprocess")
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                   help="a Megatron-LM checkout (default: $MEGATRON_LM; none: its rows are skipped)")
    p.add_argument("--tokenizer-model", help="default: train one (tools/train_tokenizer.py, --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=int, default=10, help="the large corpus is the stdlib repeated this many times")
    p.add_argument("--scale-repeats", type=int, default=1)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "preprocess.json"))
    return p.parse_args()


# -- set-up ------------------------------------------------------------------------------------------


def make_corpus(workdir: Path, scale: int) -> tuple[Path, Path, int]:
    """The stdlib's *.py files (UTF-8, non-empty) as JSONL, and the same repeated `scale` times."""
    files, _ = resolve_inputs([sysconfig.get_paths()["stdlib"]])
    lines = []
    for f in files:
        if not f.endswith(".py"):
            continue
        try:
            text = Path(f).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            lines.append(json.dumps({"text": text}) + "\n")
    small, large = workdir / "stdlib.jsonl", workdir / f"stdlib_x{scale}.jsonl"
    body = "".join(lines)
    small.write_text(body)
    with open(large, "w") as f:
        for _ in range(scale):
            f.write(body)
    return small, large, len(lines)


def megatron_checkout(given: str | None) -> Path | None:
    """The Megatron-LM checkout to compare with, or None (rows skipped); a wrong one is an error."""
    if not given:
        print("Megatron-LM: skipped (no checkout: pass --megatron-lm DIR or set MEGATRON_LM; "
              "see benchmarks/README.md for how to get one)", flush=True)
        return None
    d = Path(given).expanduser()
    if not (d / "tools" / "preprocess_data.py").is_file() or not (d / "megatron").is_dir():
        print(f"preprocess benchmark: error: --megatron-lm {given}: not a Megatron-LM checkout "
              "(needs tools/preprocess_data.py and megatron/)", file=sys.stderr)
        sys.exit(2)
    return d.resolve()


def checkout_version(d: Path) -> str | None:
    """``git describe`` of the checkout (the release compared with), when it is a git work tree."""
    out = subprocess.run(["git", "-C", str(d), "describe", "--tags", "--always"], capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def ensure_tokenizer(args: argparse.Namespace, workdir: Path) -> Path:
    if args.tokenizer_model:
        return Path(args.tokenizer_model)
    prefix = workdir / f"stdlib_{args.vocab_size}"
    if not Path(f"{prefix}.model").is_file():
        subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input",
                        sysconfig.get_paths()["stdlib"], "--vocab-size", str(args.vocab_size),
                        "--output-prefix", str(prefix)], check=True, capture_output=True)
    return Path(f"{prefix}.model")


# -- measuring ---------------------------------------------------------------------------------------


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, CPU seconds and peak RSS summed over the process tree (sampled every 20 ms)."""
    peak = [0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    ps = psutil.Process(proc.pid)
    cpu_seen: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                procs = [ps] + ps.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                        t = p.cpu_times()
                        cpu_seen[p.pid] = t.user + t.system
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = os.times()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    after = os.times()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak[0] / 2**20, "stderr": err, "stdout": out}


def dataset_stats(prefix: str) -> tuple[int, int]:
    ds = IndexedDataset(prefix)
    return ds.num_documents, ds.num_tokens


def ours_cmd(inp: Path, prefix: Path, model: Path, workers: int) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(inp), "--output-prefix",
            str(prefix), "--tokenizer-model", str(model), "--workers", str(workers), "--append-eod", "--quiet",
            "--summary-json", f"{prefix}.summary.json"]


def megatron_cmd(mdir: Path, inp: Path, prefix: Path, model: Path, workers: int) -> list[str]:
    return [sys.executable, str(mdir / "tools" / "preprocess_data.py"), "--input", str(inp), "--output-prefix",
            str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
            "--workers", str(workers), "--append-eod", "--log-interval", "200"]


def megatron_steady_rate(stderr: str) -> float | None:
    """docs/s from Megatron-LM's last progress line (excludes its start-up)."""
    rates = re.findall(r"Processed \d+ documents \(([\d.]+) docs/s", stderr)
    return float(rates[-1]) if rates else None


def one_run(tool: str, cmd: list[str], out_prefix: Path, input_bytes: int, env: dict | None) -> dict:
    r = run_measured(cmd, env)
    docs, tokens = dataset_stats(f"{out_prefix}_text_document")
    row = {"tool": tool, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss_mib": r["peak_rss_mib"],
           "documents": docs, "tokens": tokens, "docs_per_s": docs / r["wall_s"], "tokens_per_s": tokens / r["wall_s"],
           "mb_per_s": input_bytes / 2**20 / r["wall_s"], "tokens_per_cpu_s": tokens / max(r["cpu_s"], 1e-9)}
    if tool == "megatron-lm":
        row["steady_docs_per_s"] = megatron_steady_rate(r["stderr"])
    else:  # the pipeline's own time, without interpreter start-up and tokenizer loading
        summary = json.loads(Path(f"{out_prefix}.summary.json").read_text())
        row["steady_docs_per_s"] = summary["documents"] / summary["seconds"]
    return row


def medians(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and v is not None]
    return {k: statistics.median(r[k] for r in rows if r.get(k) is not None) for k in keys}


def compare_outputs(ours: str, theirs: str, megatron_eod: int, our_eod: int) -> dict:
    """Token streams equal once Megatron-LM's own <EOD> id is mapped to ours?"""
    a, b = IndexedDataset(ours), IndexedDataset(theirs)
    same_docs = len(a) == len(b)
    differing = 0
    for i in range(min(len(a), len(b))):
        x, y = np.asarray(a[i], np.int64), np.asarray(b[i], np.int64).copy()
        y[y == megatron_eod] = our_eod
        differing += int(len(x) != len(y) or not np.array_equal(x, y))
    return {"documents_ours": len(a), "documents_megatron": len(b), "same_document_count": same_docs,
            "documents_with_different_ids": differing}


# -- main --------------------------------------------------------------------------------------------


def shared_machine(load_at_start: tuple[float, float, float]) -> dict:
    return machine("shared with other jobs while measuring: runs alternate between the tools, medians reported",
                   load_average_at_start=list(load_at_start), load_average_at_end=list(os.getloadavg()))


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    head = f"{'tool':<12} {'docs/s':>9} {'tokens/s':>11} {'MB/s':>7} {'steady docs/s':>13} {'peak RSS MiB':>12} " \
           f"{'CPU s':>7} {'tok/CPU s':>10}"
    print(head)
    print("-" * len(head))
    for name, m in rows.items():
        steady = m.get("steady_docs_per_s")
        print(f"{name:<12} {m['docs_per_s']:>9,.0f} {m['tokens_per_s']:>11,.0f} {m['mb_per_s']:>7.2f} "
              f"{(f'{steady:,.0f}' if steady else '-'):>13} {m['peak_rss_mib']:>12,.0f} {m['cpu_s']:>7.1f} "
              f"{m['tokens_per_cpu_s']:>10,.0f}")


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    mdir = megatron_checkout(args.megatron_lm)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = ensure_tokenizer(args, work)
    small, large, n_docs = make_corpus(work, args.scale)
    from megafim.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(model)
    print(f"corpus: {small} ({small.stat().st_size / 2**20:.1f} MiB, {n_docs} documents); model {model}; "
          f"workers {args.workers}; {args.repeats} {'alternating ' if mdir else ''}runs each", flush=True)
    commands = {"megafim": ours_cmd(small, work / "ours", model, args.workers)}
    if mdir is not None:
        commands["megatron-lm"] = megatron_cmd(mdir, small, work / "megatron", model, args.workers)
    runs = alternate_runs(commands, work, small.stat().st_size, args.repeats, mdir)
    med = {k: medians(v) for k, v in runs.items()}
    scale_rows = [one_run("megafim", ours_cmd(large, work / "ours_large", model, args.workers),
                          work / "ours_large", large.stat().st_size, None) for _ in range(args.scale_repeats)]
    scale_med = medians(scale_rows)

    print_table(f"stdlib JSONL, {args.workers} workers, median of {args.repeats}", med)
    print_table(f"megafim on the stdlib x{args.scale} ({large.stat().st_size / 2**20:.0f} MiB), "
                f"median of {args.scale_repeats}", {"megafim": scale_med})
    print(f"peak RSS x{args.scale} / x1: {scale_med['peak_rss_mib'] / med['megafim']['peak_rss_mib']:.2f}")
    result = {
        "benchmark": "preprocess", "machine": shared_machine(load_at_start),
        "command": command(),
        "megatron_lm": {"dir": str(mdir), "version": checkout_version(mdir)} if mdir else None,
        "corpus": {"path": str(small), "bytes": small.stat().st_size, "documents": n_docs,
                   "scaled_bytes": large.stat().st_size, "scale": args.scale},
        "tokenizer": {"model": str(model), "vocab_size": tok.vocab_size, "our_eod": tok.eod},
        "commands": {k: shown_command(v) for k, v in commands.items()},
        "runs": runs, "medians": med,
        "scaled": {"runs": scale_rows, "medians": scale_med,
                   "peak_rss_ratio_scaled_over_x1": scale_med["peak_rss_mib"] / med["megafim"]["peak_rss_mib"]},
    }
    if mdir is not None:
        result.update(compare_with_megatron(med, mdir, model, work, tok.eod))
        result["tokenizer"]["megatron_eod"] = result.pop("megatron_eod")
    write_json(args.output, result)


def alternate_runs(commands: dict[str, list[str]], work: Path, input_bytes: int, repeats: int,
                   mdir: Path | None) -> dict[str, list[dict]]:
    """Each tool ``repeats`` times, alternating, so that both see the same machine load."""
    env = dict(os.environ, PYTHONPATH=str(mdir), PYTHONWARNINGS="ignore") if mdir else None
    runs: dict[str, list[dict]] = {tool: [] for tool in commands}
    prefixes = {"megafim": work / "ours", "megatron-lm": work / "megatron"}
    for i in range(repeats):
        for tool, cmd in commands.items():
            runs[tool].append(one_run(tool, cmd, prefixes[tool], input_bytes, env if tool == "megatron-lm" else None))
        print(f"  run {i + 1}: " + ", ".join(f"{t} {r[-1]['wall_s']:.1f} s" for t, r in runs.items()), flush=True)
    return runs


def compare_with_megatron(med: dict, mdir: Path, model: Path, work: Path, our_eod: int) -> dict:
    """Ratios of the medians, and whether both tools wrote the same ids."""
    ratios = {k: med["megafim"][k] / med["megatron-lm"][k] for k in ("docs_per_s", "tokens_per_s", "mb_per_s",
                                                                    "steady_docs_per_s", "tokens_per_cpu_s")}
    ratios["peak_rss"] = med["megafim"]["peak_rss_mib"] / med["megatron-lm"]["peak_rss_mib"]
    megatron_eod = megatron_eod_id(mdir, model)
    agreement = compare_outputs(str(work / "ours_text_document"), str(work / "megatron_text_document"),
                                megatron_eod, our_eod)
    print("\nmegafim / megatron-lm: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"output agreement: {agreement}")
    return {"ratios_megafim_over_megatron": ratios, "output_agreement": agreement, "megatron_eod": megatron_eod}


def megatron_eod_id(mdir: Path, model: Path) -> int:
    """The id Megatron-LM's SentencePieceTokenizer appends for --append-eod (its own <EOD> piece)."""
    code = ("from megatron.training.tokenizer.tokenizer import _SentencePieceTokenizer as T; "
            f"print(T({str(model)!r}).eod)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(mdir), PYTHONWARNINGS="ignore"))
    return int(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
