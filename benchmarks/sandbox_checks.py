"""Cost of one sandboxed check, and the canonical solutions' wall time on a HumanEval benchmark.

    python benchmarks/sandbox_checks.py [--trivial 40] [--benchmark humaneval] [--workers 2] [--out ...json]

Part 1 runs ``--trivial`` one-line checks one at a time (workers 1) and reports the median and the
90th percentile of their wall time: the fixed cost of a check (interpreter start, namespaces, the
four processes, mounts, clean-up). Part 2 scores every canonical solution of ``--benchmark``
(``humaneval`` or an infilling benchmark) with ``--workers`` at a time and reports the count that
passed and the wall time. The machine may be shared: the JSON says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megafim.eval import humaneval, humaneval_infilling  # noqa: E402
from megafim.eval.execution import Check, SandboxConfig, isolation_report, run_check  # noqa: E402
from megafim.eval.humaneval_infilling import Sample  # noqa: E402
from report import command, machine, write_json  # noqa: E402


def trivial_latencies(count: int, config: SandboxConfig) -> list[float]:
    check = Check("def f(x):\n    return x + 1\n", "f", "def check(c):\n    assert c(1) == 2\n")
    times = []
    for _ in range(count):
        start = time.perf_counter()
        if not run_check(check, config).passed:
            raise SystemExit("a trivial check failed: the sandbox is broken on this machine")
        times.append(time.perf_counter() - start)
    return times


def canonical_run(benchmark: str, workers: int, config: SandboxConfig) -> dict:
    problems = (humaneval.load_problems() if benchmark == "humaneval"
                else humaneval_infilling.load_problems(benchmark))
    samples = [Sample(p.task_id, p.canonical_solution) for p in problems.values()]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = humaneval_infilling.evaluate_samples(benchmark, problems, samples, [1],
                                                      Path(tmp) / "r.jsonl", config, workers)
        wall = time.perf_counter() - start
    return {"benchmark": benchmark, "tasks": len(problems),
            "passed": round(report.pass_at_k[1] * len(problems)), "workers": workers,
            "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trivial", type=int, default=40, help="trivial checks to time, one at a time")
    p.add_argument("--benchmark", default="humaneval",
                   choices=["humaneval", *humaneval_infilling.BENCHMARKS])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=20.0, help="per check (generous on a busy machine)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sandbox_checks.json"))
    args = p.parse_args()
    config = SandboxConfig(timeout_s=args.timeout)
    times = sorted(trivial_latencies(args.trivial, config))
    trivial = {"checks": len(times), "median_s": round(statistics.median(times), 3),
               "p90_s": round(times[int(0.9 * (len(times) - 1))], 3)}
    canonical = canonical_run(args.benchmark, args.workers, config)
    print(f"{'measure':<34}{'value':>12}")
    print(f"{'trivial check, median (s)':<34}{trivial['median_s']:>12}")
    print(f"{'trivial check, p90 (s)':<34}{trivial['p90_s']:>12}")
    print(f"{'canonical ' + args.benchmark + ' passed':<34}{canonical['passed']:>8}/{canonical['tasks']}")
    print(f"{'canonical wall (s), workers ' + str(args.workers):<34}{canonical['wall_s']:>12}")
    write_json(args.out, {"command": command(), "machine": machine("shared with other jobs"),
                          "sandbox": isolation_report(config), "trivial": trivial,
                          "canonical": canonical})


if __name__ == "__main__":
    main()
