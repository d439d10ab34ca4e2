#!/usr/bin/env python3
"""Preprocessing with and without repository grouping (--group-by-key), on the same corpus.

    python benchmarks/preprocess_group.py          # writes benchmarks/results/preprocess_group.json

The corpus is the Python standard library's *.py files as JSONL records ``{"repo", "path", "text"}``
(a repository: a top-level package or module of the stdlib), in two orders: sorted by repository (the
common case, as StarCoder's data) and shuffled (every repository interleaved with all the others).
Four runs of tools/preprocess_data.py (--workers 2, --append-eod, the same tokenizer):

  plain              one document per record (no grouping), the sorted file;
  grouped-sorted     --group-by-key repo --path-key path on the sorted file;
  grouped-shuffled   the same on the shuffled file (default --max-group-bytes holds all of it);
  grouped-4MiB       the sorted file with --max-group-bytes 4 MiB: the memory bound, big repositories split.

The runs alternate (plain, grouped-sorted, grouped-shuffled, plain, ...) so that all see the same
machine load; each number is the median of --repeats. Reported: input records/s, output documents,
tokens/s, MB/s, the pipeline's own records/s (no start-up), peak RSS of the process and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megafim.data.indexed import IndexedDataset  # noqa: E402
from megafim.data.preprocess import resolve_inputs  # noqa: E402
from preprocess import ensure_tokenizer, medians, run_measured  # noqa: E402  (benchmarks/preprocess.py)
from report import command as report_command, machine, shown_command, shown_path, write_json  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/megafim-bench-preprocess-group")
    p.add_argument("--tokenizer-model", help="default: train one (tools/train_tokenizer.py, --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "preprocess_group.json"))
    return p.parse_args()


def make_corpus(workdir: Path, seed: int = 0) -> tuple[Path, Path, int, int]:
    """(sorted file, shuffled file, records, repositories) from the stdlib's UTF-8 *.py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for f in resolve_inputs([str(root)])[0]:
        rel = Path(f).relative_to(root)
        if rel.suffix != ".py":
            continue
        try:
            text = Path(f).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        repo = f"stdlib/{rel.parts[0].removesuffix('.py')}"
        records.append(json.dumps({"repo": repo, "path": rel.as_posix(), "text": text}) + "\n")
    sorted_path, shuffled_path = workdir / "stdlib_repos_sorted.jsonl", workdir / "stdlib_repos_shuffled.jsonl"
    records.sort(key=lambda line: json.loads(line)["repo"])
    sorted_path.write_text("".join(records))
    random.Random(seed).shuffle(records)
    shuffled_path.write_text("".join(records))
    repos = len({json.loads(line)["repo"] for line in records})
    return sorted_path, shuffled_path, len(records), repos


def command(inp: Path, prefix: Path, model: Path, workers: int, group: list[str] | None) -> list[str]:
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(inp), "--output-prefix",
           str(prefix), "--tokenizer-model", str(model), "--workers", str(workers), "--append-eod", "--quiet",
           "--summary-json", f"{prefix}.summary.json"]
    return cmd + (["--group-by-key", "repo", "--path-key", "path", *group] if group is not None else [])


def one_run(cmd: list[str], prefix: Path, input_bytes: int, records: int) -> dict:
    r = run_measured(cmd)
    ds = IndexedDataset(f"{prefix}_text_document")
    summary = json.loads(Path(f"{prefix}.summary.json").read_text())
    return {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss_mib": r["peak_rss_mib"],
            "records_per_s": records / r["wall_s"], "documents": ds.num_documents, "tokens": ds.num_tokens,
            "tokens_per_s": ds.num_tokens / r["wall_s"], "mb_per_s": input_bytes / 2**20 / r["wall_s"],
            "steady_records_per_s": records / summary["seconds"], "split_groups": summary.get("split_groups", 0)}


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    head = (f"{'run':<17} {'records/s':>9} {'documents':>9} {'tokens/s':>11} {'MB/s':>6} {'steady rec/s':>12} "
            f"{'peak RSS MiB':>12} {'CPU s':>6}")
    print(head)
    print("-" * len(head))
    for name, m in rows.items():
        print(f"{name:<17} {m['records_per_s']:>9,.0f} {m['documents']:>9,.0f} {m['tokens_per_s']:>11,.0f} "
              f"{m['mb_per_s']:>6.2f} {m['steady_records_per_s']:>12,.0f} {m['peak_rss_mib']:>12,.0f} {m['cpu_s']:>6.1f}")


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = ensure_tokenizer(args, work)
    sorted_path, shuffled_path, n_records, n_repos = make_corpus(work)
    size = sorted_path.stat().st_size
    print(f"corpus: {n_records} records in {n_repos} repositories, {size / 2**20:.1f} MiB; model {model}; "
          f"workers {args.workers}; {args.repeats} alternating runs each", flush=True)
    plan = {"plain": (sorted_path, None), "grouped-sorted": (sorted_path, []),
            "grouped-shuffled": (shuffled_path, []),
            "grouped-4MiB": (sorted_path, ["--max-group-bytes", str(4 * 2**20)])}
    commands = {name: command(inp, work / name, model, args.workers, group) for name, (inp, group) in plan.items()}
    runs: dict[str, list[dict]] = {name: [] for name in plan}
    for i in range(args.repeats):
        for name, cmd in commands.items():
            runs[name].append(one_run(cmd, work / name, size, n_records))
        print(f"  run {i + 1}: " + ", ".join(f"{n} {r[-1]['wall_s']:.1f} s" for n, r in runs.items()), flush=True)
    med = {name: medians(rows) for name, rows in runs.items()}
    print_table(f"stdlib as repositories, {args.workers} workers, median of {args.repeats}", med)
    print("repositories split: " + ", ".join(f"{k} {m['split_groups']:.0f}" for k, m in med.items()))
    ratios = {name: med[name]["steady_records_per_s"] / med["plain"]["steady_records_per_s"] for name in med}
    print("steady records/s over plain: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    result = {
        "benchmark": "preprocess_group",
        "machine": machine("shared with other jobs while measuring: runs alternate, medians reported",
                           load_average_at_start=list(load_at_start), load_average_at_end=list(os.getloadavg())),
        "command": report_command(),
        "corpus": {"records": n_records, "repositories": n_repos, "bytes": size},
        "tokenizer": shown_path(model), "commands": {k: shown_command(v) for k, v in commands.items()},
        "runs": runs, "medians": med, "steady_records_per_s_over_plain": ratios,
    }
    write_json(args.output, result)


if __name__ == "__main__":
    main()
