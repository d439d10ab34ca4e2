"""HumanEval infilling (Bavarian et al., 2022): generate middles, run the unit tests, report pass@k.

    python -m megafim.eval.humaneval_infilling --benchmark random-span-light \\
        --samples samples.jsonl --k 1,10 --json

WARNING: this runs code written by a model. The sandbox (megafim/eval/execution.py) limits what
it can do, but is no substitute for running evaluations in a disposable container or VM.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from megafim.eval.execution import (Check, ExecutionResult, SandboxConfig, SandboxError,
                                    isolation_notes, isolation_report, run_checks,
                                    sandbox_errors)
from megafim.eval.pass_at_k import mean_pass_at_k

DATA_DIR_ENV = "HUMAN_EVAL_INFILLING_DIR"
BENCHMARKS = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}
_PROBLEM_FIELDS = ("task_id", "prompt", "suffix", "canonical_solution", "test", "entry_point")
WARNING = ("WARNING: this executes code written by a language model. It runs in a sandbox with "
           "resource limits, separate namespaces, a private /tmp and an unprivileged uid where the "
           "OS allows, but that is not a security boundary: run it in a disposable container or "
           "VM.")


@dataclass(frozen=True)
class Problem:
    """One infilling task: the model writes the middle between ``prompt`` and ``suffix``."""

    task_id: str
    prompt: str
    suffix: str
    canonical_solution: str
    test: str
    entry_point: str

    def check(self, completion: str) -> Check:
        """The completion passes when ``check(entry_point)`` of the test returns. The test runs
        apart from the code, with the reference program for the helpers some tests call."""
        return Check(code=self.prompt + completion + self.suffix, entry_point=self.entry_point,
                     test=self.test,
                     context=self.prompt + self.canonical_solution + self.suffix)


@dataclass(frozen=True)
class Sample:
    task_id: str
    completion: str


@dataclass(frozen=True)
class Report:
    benchmark: str
    n_tasks: int
    n_benchmark_tasks: int
    samples_per_task: int
    """The smallest sample count over the tasks (pass@k is reported only for k up to it)."""
    samples_per_task_max: int
    pass_at_k: dict[int, float]
    results_path: str

    def to_json(self, isolation: dict | None = None) -> dict:
        out = {
            "benchmark": self.benchmark, "n_tasks": self.n_tasks,
            "n_benchmark_tasks": self.n_benchmark_tasks,
            "samples_per_task": self.samples_per_task,
            "samples_per_task_max": self.samples_per_task_max,
            "pass_at_k": {f"pass@{k}": v for k, v in self.pass_at_k.items()},
            "results_path": self.results_path,
        }
        if isolation is not None:
            out["sandbox"] = isolation
        return out


PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "data" / "human-eval-infilling"
"""The benchmark files installed with megafim (MIT, OpenAI; LICENSE beside them)."""


def resolve_data_dir(data_dir: str | None) -> Path:
    """The flag wins, then $HUMAN_EVAL_INFILLING_DIR, then the data installed with megafim;
    nothing is downloaded."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        return PACKAGED_DATA_DIR
    path = Path(chosen)
    if not path.is_dir():
        raise FileNotFoundError(f"benchmark data directory {path} does not exist")
    return path


def load_problems(benchmark: str, data_dir: str | Path | None = None) -> dict[str, Problem]:
    """The tasks of one benchmark, in file order, keyed by task_id."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    path = resolve_data_dir(str(data_dir) if data_dir else None) / BENCHMARKS[benchmark]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (benchmark {benchmark!r})")
    problems: dict[str, Problem] = {}
    for line_no, record in _read_jsonl(path):
        missing = [f for f in _PROBLEM_FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise ValueError(f"{path}:{line_no}: missing or non-string fields {missing}")
        if record["task_id"] in problems:
            raise ValueError(f"{path}:{line_no}: duplicate task_id {record['task_id']!r}")
        problems[record["task_id"]] = Problem(**{f: record[f] for f in _PROBLEM_FIELDS})
    if not problems:
        raise ValueError(f"{path} holds no tasks")
    return problems


def read_samples(path: str | Path, problems: dict[str, Problem]) -> list[Sample]:
    """``{"task_id", "completion"}`` lines (several per task allowed); other keys are ignored."""
    samples = []
    for line_no, record in _read_jsonl(Path(path)):
        task_id, completion = record.get("task_id"), record.get("completion")
        if not isinstance(task_id, str) or not isinstance(completion, str):
            raise ValueError(f"{path}:{line_no}: need string fields 'task_id' and 'completion'")
        if task_id not in problems:
            raise ValueError(f"{path}:{line_no}: task_id {task_id!r} is not in the benchmark")
        samples.append(Sample(task_id, completion))
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, record


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def results_path_for(samples_path: str | Path) -> Path:
    """``x.jsonl`` -> ``x.results.jsonl``, beside it."""
    path = Path(samples_path)
    name = path.name
    for ending in (".jsonl.gz", ".jsonl"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return path.with_name(name + ".results.jsonl")


def evaluate_samples(
    benchmark: str,
    problems: dict[str, Problem],
    samples: Sequence[Sample],
    ks: Iterable[int],
    results_path: str | Path,
    config: SandboxConfig = SandboxConfig(),
    workers: int = 0,
    progress: bool = False,
) -> Report:
    """Run every sample's program, write per-sample results (input order) and score pass@k."""
    checks = [problems[s.task_id].check(s.completion) for s in samples]
    done = [0]

    def tick(_: int, __: ExecutionResult) -> None:
        done[0] += 1  # called from worker threads; an approximate count is fine for progress
        if progress and (done[0] % 50 == 0 or done[0] == len(checks)):
            print(f"executed {done[0]}/{len(checks)}", file=sys.stderr, flush=True)

    results = run_checks(checks, config, workers=workers, on_result=tick)
    write_jsonl(results_path, (
        {"task_id": s.task_id, "completion": s.completion, "passed": r.passed, "result": r.result}
        for s, r in zip(samples, results)
    ))
    errors = sandbox_errors(results)
    if errors:  # after the results are written: they show which samples could not be run
        raise SandboxError(f"{len(errors)} samples could not be run (see {results_path}): "
                           f"{errors[0]}")
    counts: dict[str, list[int]] = {}
    for sample, result in zip(samples, results):
        n_c = counts.setdefault(sample.task_id, [0, 0])
        n_c[0] += 1
        n_c[1] += result.passed
    per_task = [(n, c) for n, c in counts.values()]
    return Report(
        benchmark=benchmark, n_tasks=len(counts), n_benchmark_tasks=len(problems),
        samples_per_task=min(n for n, _ in per_task),
        samples_per_task_max=max(n for n, _ in per_task),
        pass_at_k=mean_pass_at_k(per_task, ks), results_path=str(results_path),
    )


def generate_samples(generator, problems: Sequence[Problem], n: int, temperature: float,
                     top_p: float, max_new_tokens: int, mode: str,
                     progress: bool = False) -> list[Sample]:
    """``n`` completions per task from a ``CompletionGenerator``."""
    samples = []
    for i, problem in enumerate(problems, 1):
        middles = generator.generate(problem.prompt, problem.suffix, n=n, temperature=temperature,
                                     top_p=top_p, max_new_tokens=max_new_tokens, mode=mode)
        if len(middles) != n:
            raise RuntimeError(f"generator returned {len(middles)} completions, asked for {n}")
        samples.extend(Sample(problem.task_id, m) for m in middles)
        if progress and (i % 10 == 0 or i == len(problems)):
            print(f"generated {i}/{len(problems)} tasks", file=sys.stderr, flush=True)
    return samples


def format_table(report: Report) -> str:
    ks = list(report.pass_at_k)
    header = ["benchmark", "tasks", "samples/task"] + [f"pass@{k}" for k in ks]
    spt = str(report.samples_per_task)
    if report.samples_per_task_max != report.samples_per_task:
        spt += f"-{report.samples_per_task_max}"
    row = [report.benchmark, f"{report.n_tasks}/{report.n_benchmark_tasks}", spt]
    row += [f"{100 * report.pass_at_k[k]:.2f}%" for k in ks]
    widths = [max(len(h), len(r)) for h, r in zip(header, row)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join(r.ljust(w) for r, w in zip(row, widths))]
    if not ks:
        lines.append("(no pass@k: every requested k exceeds the samples per task)")
    return "\n".join(lines)


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k wants integers separated by commas, got {text!r}")
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megafim.eval.humaneval_infilling",
        description="HumanEval infilling benchmarks: pass@k of generated middles.\n\n" + WARNING,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="random-span-light", choices=sorted(BENCHMARKS))
    p.add_argument("--data-dir", help=f"folder with the benchmark files (default: "
                   f"${DATA_DIR_ENV}, else the copy installed with megafim)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="score this JSONL of {task_id, completion}; no generation")
    src.add_argument("--hf-model", help="generate with this Hugging Face causal LM directory")
    src.add_argument("--load", help="generate with a megafim checkpoint (save or step directory)")
    src.add_argument("--canonical", action="store_true",
                     help="score the reference middles (checks the sandbox on this machine)")
    g = p.add_argument_group("generation")
    g.add_argument("--mode", choices=("psm", "spm"), default="psm", help="FIM prompt order")
    g.add_argument("--num-samples", type=int, default=1, help="samples per task (n)")
    g.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=16, help="samples generated at once")
    g.add_argument("--device", help="torch device (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, help="only the first N tasks (quick runs)")
    g.add_argument("--output", help="samples JSONL to write (default: "
                   "humaneval-<benchmark>-samples.jsonl in the current directory)")
    e = p.add_argument_group("execution")
    e.add_argument("--k", type=parse_ks, default=[1, 10], help="pass@k values, e.g. 1,10")
    e.add_argument("--workers", type=int, default=0, help="parallel programs (0: one per CPU)")
    e.add_argument("--timeout", type=float, default=5.0, help="seconds per program")
    e.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    e.add_argument("--results", help="per-sample results JSONL (default: beside the samples)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _samples_from_args(args, problems: dict[str, Problem]) -> tuple[list[Sample], Path]:
    if args.samples:
        return read_samples(args.samples, problems), Path(args.samples)
    tasks = list(problems.values())[: args.limit] if args.limit else list(problems.values())
    if args.canonical:
        samples = [Sample(t.task_id, t.canonical_solution) for t in tasks]
    else:
        from megafim.eval.generators import HFCompletionGenerator, MegafimCompletionGenerator

        if args.load:
            generator = MegafimCompletionGenerator(args.load, device=args.device, seed=args.seed)
        else:
            import torch

            torch.manual_seed(args.seed)
            generator = HFCompletionGenerator(args.hf_model, device=args.device,
                                              dtype=args.dtype, batch_size=args.batch_size)
        samples = generate_samples(generator, tasks, args.num_samples, args.temperature,
                                   args.top_p, args.max_new_tokens, args.mode, progress=True)
    out = Path(args.output or f"humaneval-{args.benchmark}-samples.jsonl")
    write_jsonl(out, ({"task_id": s.task_id, "completion": s.completion} for s in samples))
    return samples, out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")
    print(WARNING, file=sys.stderr)
    problems = load_problems(args.benchmark, args.data_dir)
    samples, samples_path = _samples_from_args(args, problems)
    config = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb)
    isolation = isolation_report(config)
    print(f"sandbox: {isolation}", file=sys.stderr)
    return score_and_report(args.benchmark, problems, samples, samples_path, args, config, isolation)


def score_and_report(benchmark: str, problems, samples, samples_path: Path, args: argparse.Namespace,
                     config: SandboxConfig, isolation) -> int:
    """Run ``samples`` through the sandbox, write the per-sample results, print the pass@k table (or
    JSON with ``args.json``); shared by this module and ``megafim.eval.humaneval``."""
    for note in isolation_notes(isolation):
        print(note, file=sys.stderr)
    report = evaluate_samples(
        benchmark, problems, samples, args.k,
        results_path=args.results or results_path_for(samples_path),
        config=config, workers=args.workers, progress=True,
    )
    if args.json:
        print(json.dumps(report.to_json(isolation)))
    else:
        print(format_table(report))
        print(f"per-sample results: {report.results_path}")
    return 0


def run_cli(main_fn) -> int:
    """``main_fn()`` with the expected errors (bad input, missing data, no generator, a broken
    sandbox) as one line on stderr and exit status 2 instead of a traceback."""
    from megafim.eval.execution import SandboxError
    try:
        return main_fn()
    except (FileNotFoundError, ValueError, SandboxError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
