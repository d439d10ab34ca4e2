"""How much of the infilling prompt an SPM session reuses while a user types at the end of the prefix.

    python benchmarks/spm_reuse.py --checkpoint runs/quickstart/checkpoints [--files 4] [--out ...json]

For held-out standard-library files (the quick start's split) it cuts each file at a line, takes the
code before it as the prefix and the code after the following line as the suffix, and "types" that
line one character at a time. After every keystroke it asks for a middle:
- SPM: ``SpmInfillSession.complete`` (the suffix's keys/values and the unchanged prefix tokens stay
  cached; ``last_reused`` counts them), timed;
- PSM: ``infill(mode="psm")``, which recomputes its prompt, timed; and, for the count only, the best
  any PSM cache could do: reuse the longest common start with the previous PSM prompt, which ends
  where the prefix changed, because the suffix comes after the prefix.
Reports prompt tokens fed per keystroke (median), the share reused, and wall time per keystroke.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megafim.data.tokenizer import Tokenizer  # noqa: E402
from megafim.inference.infill import SpmInfillSession, fim_prompt, infill  # noqa: E402
from megafim.inference.loading import load_model  # noqa: E402
from megafim.inference.sampling import SamplingConfig  # noqa: E402
from report import command, machine, write_json  # noqa: E402
from speculative_decoding import read, stdlib_files  # noqa: E402


def common_start(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def edit_case(text: str, tok: Tokenizer, budget: int) -> tuple[str, str, str] | None:
    """(prefix, typed line, suffix) around the middle of ``text``, each side within ``budget`` tokens."""
    lines = text.splitlines(keepends=True)
    mid = len(lines) // 2
    while mid < len(lines) and len(lines[mid].strip()) < 20:
        mid += 1
    if mid >= len(lines) - 1:
        return None
    prefix, suffix = "".join(lines[:mid]), "".join(lines[mid + 1:])
    while len(tok.encode(prefix)) > budget:  # keep the end of the prefix and the start of the suffix
        prefix = prefix[len(prefix) // 4:]
    while len(tok.encode(suffix)) > budget:
        suffix = suffix[: 3 * len(suffix) // 4]
    return prefix, lines[mid].rstrip("\n"), suffix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/spm_reuse.json")
    args = p.parse_args()
    loaded = load_model(args.checkpoint)
    model, tok = loaded.model, Tokenizer.from_file(loaded.tokenizer_path)
    budget = (model.config.max_seq_len - args.max_new_tokens - 40) // 2  # room for the typed line
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    spm_fed, psm_fed, lengths, spm_s, psm_s, cases = [], [], [], [], [], []
    for path in stdlib_files(held_out=True):
        case = edit_case(read(path), tok, budget)
        if case is None:
            continue
        prefix, line, suffix = case
        cases.append(path.name)
        session = SpmInfillSession(model, tok, suffix, sampling)
        previous_psm: list[int] = []
        for i in range(len(line) + 1):
            typed = prefix + line[:i]
            spm_prompt = fim_prompt(tok, typed, suffix, "spm")
            t0 = time.perf_counter()
            session.complete(typed)
            t1 = time.perf_counter()
            infill(model, tok, typed, suffix, mode="psm", sampling=sampling)
            t2 = time.perf_counter()
            psm_prompt = fim_prompt(tok, typed, suffix, "psm")
            if i > 0:  # the first call fills the cache: count the keystrokes after it
                spm_fed.append(len(spm_prompt) - session.last_reused)
                psm_fed.append(len(psm_prompt) - min(common_start(psm_prompt, previous_psm), len(psm_prompt) - 1))
                lengths.append(len(spm_prompt))
                spm_s.append(t1 - t0)
                psm_s.append(t2 - t1)
            previous_psm = psm_prompt
        if len(cases) == args.files:
            break
    med = statistics.median
    result = {
        "benchmark": "spm_reuse",
        "machine": machine("shared with other jobs"),
        "command": command(),
        "checkpoint": str(loaded.source), "files": cases, "keystrokes": len(spm_fed),
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_median": med(lengths),
        "fed_per_keystroke_median": {"spm_session": med(spm_fed), "psm_best_possible_cache": med(psm_fed)},
        "fed_per_keystroke_mean": {"spm_session": round(statistics.fmean(spm_fed), 2),
                                   "psm_best_possible_cache": round(statistics.fmean(psm_fed), 2)},
        "reused_share_mean": {"spm_session": round(1 - sum(spm_fed) / sum(lengths), 3),
                              "psm_best_possible_cache": round(1 - sum(psm_fed) / sum(lengths), 3)},
        "seconds_per_keystroke_median": {"spm_session": round(med(spm_s), 4), "psm_infill": round(med(psm_s), 4)},
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
