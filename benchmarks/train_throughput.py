"""Training throughput: megafim's trainer vs Hugging Face LlamaForCausalLM, side by side in one run.

    python benchmarks/train_throughput.py [--steps 12] [--micro-batch 8] [--out FILE]   (one GPU)
    python benchmarks/train_throughput.py --smoke-cpu                                  (checks the script)

Shape (the issue's): Llama 1.3B (hidden 2048, 24 layers, 16 heads, FFN 5632), vocabulary 32000, sequence
2048, one GPU. Rows:
- ``hf eager`` / ``hf compiled``: ``LlamaForCausalLM`` (sdpa attention), fp32 master weights with bf16
  autocast, fused AdamW; ``torch.compile`` for the second.
- ``megafim n_future=1``: ``python -m megafim.train`` itself (DeepSpeed ZeRO-1, bf16, the fused loss), on a
  synthetic ``.bin/.idx`` of random tokens, FIM off so both read the same kind of tokens.
- ``megafim n_future=1 compiled``: the same with ``model.compile = true`` (torch.compile per block).
- ``megafim n_future=4 compiled``: the same total layers (a 21-layer trunk + 4 one-layer heads); with
  ``--skip-compiled``, ``megafim n_future=4`` eager, compared with the eager n_future=1 row.

With ``--profile`` (as ``gpu_all.sh`` runs it), each megafim n_future=1 row trains two more steps under
torch.profiler (``--profile-step-start``) after the timed ones, and its 25 costliest operators go into the
row (``profile_top_ops``): where the trainer's time goes, next to the rate.

tokens/s is the median over the timed steps (the first steps warm up). MFU = (6 x non-embedding
parameters incl. the unembedding + 12 x layers x hidden x seq) x tokens/s / 989e12 (H100/H200 bf16).
Targets: megafim n_future=1 >= 1.2x hf compiled (>= 54% MFU); n_future=4 >= 0.9x of n_future=1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import command, machine, write_json  # noqa: E402

PEAK_FLOPS = 989e12
SHAPE = dict(hidden=2048, layers=24, heads=16, ffn=5632, vocab=32000, seq=2048)
SMOKE = dict(hidden=64, layers=4, heads=4, ffn=128, vocab=2000, seq=64)


def flops_per_token(s: dict) -> float:
    d, v = s["hidden"], s["vocab"]
    block = 4 * d * d + 3 * d * s["ffn"] + 2 * d
    nonembed = s["layers"] * block + d + v * d  # trunk + heads, final norm, unembedding
    return 6.0 * nonembed + 12.0 * s["layers"] * d * s["seq"]


def hf_tokens_per_s(s: dict, steps: int, micro_batch: int, compiled: bool, device: str) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=s["seq"], tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    step_fn = torch.compile(model) if compiled else model
    tokens = torch.randint(0, s["vocab"], (micro_batch, s["seq"]), device=device)
    rates = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = step_fn(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        rates.append(micro_batch * s["seq"] / (time.perf_counter() - t0))
    del model, opt, step_fn
    if device == "cuda":
        torch.cuda.empty_cache()
    return rates


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_data(work: Path, s: dict, max_bytes: int) -> tuple[str, str]:
    """A tokenizer with the benchmark's vocabulary (trained on a slice of the stdlib) and random tokens."""
    from megafim.data.indexed import IndexedDatasetBuilder

    prefix = work / "tok"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", str(stdlib),
                    "--vocab-size", str(s["vocab"]), "--output-prefix", str(prefix), "--max-bytes", str(max_bytes)],
                   check=True, capture_output=True)
    data = work / "random_text_document"
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(data, np.uint16) as builder:
        for _ in range(256):
            builder.add_document(rng.integers(6, s["vocab"], size=8 * s["seq"], dtype=np.uint16))
    return f"{prefix}.model", str(data)


def megafim_tokens_per_s(s: dict, steps: int, micro_batch: int, n_future: int, tok: str, data: str,
                         compiled: bool, profile_dir: Path | None = None) -> tuple[list[float], list[dict]]:
    """tokens/s of each step, and with ``profile_dir`` the top operators of two more steps recorded by
    torch.profiler after the timed ones (``--profile-step-start``; they are not in the rates)."""
    overrides = {"hidden_size": s["hidden"], "n_layers": s["layers"] - (n_future - 1), "n_heads": s["heads"],
                 "n_kv_heads": s["heads"], "ffn_hidden_size": s["ffn"], "max_seq_len": s["seq"]}
    cmd = [sys.executable, "-m", "megafim.train", "--config", str(ROOT / "examples/configs/1.3B.yaml"),
           "--data-path", data, "--tokenizer-model", tok, "--seq-length", str(s["seq"]),
           "--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch),
           "--train-iters", str(steps + 2 * bool(profile_dir)), "--n-future", str(n_future), "--fim-rate", "0",
           "--tensor-model-parallel-size", "1", "--zero-stage", "1", "--lr-warmup-iters", "1",
           "--eval-interval", "0",
           "--set", "logging.log_interval=1", "--set", "logging.tensorboard=false",
           "--set", "logging.progress_bar=\"off\"", "--set", "checkpoint.save_on_signal=false",
           "--set", f"model.compile={str(compiled).lower()}"]
    for key, value in overrides.items():
        cmd += ["--set", f"model.{key}={value}"]
    if profile_dir:
        cmd += ["--profile-step-start", str(steps + 1), "--profile-step-end", str(steps + 2),
                "--set", f"logging.profile_dir={profile_dir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"megafim.train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    rates = [float(m.replace(",", "")) for m in re.findall(r"tok/s ([\d,]+)", result.stdout)][:steps]
    ops = json.loads((profile_dir / "rank0" / "ops.json").read_text())["ops"][:25] if profile_dir else []
    return rates, ops


def summarize(rates: list[float], warmup: int, s: dict) -> dict:
    timed = rates[warmup:] or rates
    median = statistics.median(timed)
    return {"tokens_per_s": median, "mfu": flops_per_token(s) * median / PEAK_FLOPS, "steps_timed": len(timed)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--skip-compiled", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--profile", action="store_true",
                   help="megafim n_future=1 rows: also profile two steps after the timed ones "
                        "(top ops into the JSON)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput.json")
    p.add_argument("--smoke-cpu", action="store_true", help="tiny shapes on the CPU: checks the script, no numbers")
    args = p.parse_args()
    if not args.smoke_cpu and not torch.cuda.is_available():
        print("SKIP train_throughput: no CUDA device (use --smoke-cpu to check the script)", file=sys.stderr)
        return 2
    s = SMOKE if args.smoke_cpu else SHAPE
    device = "cpu" if args.smoke_cpu else "cuda"
    steps, warmup = (3, 1) if args.smoke_cpu else (args.steps, args.warmup)
    rows = {}
    doc = {"benchmark": "train_throughput", "command": command(), "shape": s,
           "micro_batch": args.micro_batch, "steps": steps, "warmup": warmup, "smoke_cpu": args.smoke_cpu,
           "machine": machine(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke run)"),
           "rows": rows}

    # Each row is printed and saved at once: a run cut short keeps the rows it measured.
    def add(name: str, measured: tuple[list[float], list[dict]]) -> None:
        rates, ops = measured
        rows[name] = summarize(rates, warmup, s)
        if ops:
            rows[name]["profile_top_ops"] = ops
        print(f"{name}: {rows[name]['tokens_per_s']:,.0f} tokens/s, MFU {rows[name]['mfu']:.1%}", flush=True)
        write_json(args.out, doc)

    with tempfile.TemporaryDirectory() as tmp:
        tok, data = make_data(Path(tmp), s, 2_000_000 if args.smoke_cpu else 40_000_000)
        # The rows the targets compare come first, in case a time limit cuts the run short. n_future=4
        # is compared with n_future=1 run the same way (compiled, unless --skip-compiled).
        compiled = not args.skip_compiled
        mega = "megafim n_future={}" + " compiled" * compiled

        def megafim(n_future: int, compile_blocks: bool):
            profile = Path(tmp) / f"profile_n{n_future}_{'compiled' if compile_blocks else 'eager'}"
            return lambda: megafim_tokens_per_s(s, steps, args.micro_batch, n_future, tok, data, compile_blocks,
                                                profile if args.profile and n_future == 1 else None)

        def hf(compile_model: bool):
            return lambda: (hf_tokens_per_s(s, steps, args.micro_batch, compile_model, device), [])

        jobs = [("megafim n_future=1", megafim(1, False))]
        if compiled:
            jobs.append((mega.format(1), megafim(1, True)))
            if not args.smoke_cpu:  # inductor on the CPU: minutes, and no number to compare with
                jobs.append(("hf compiled", hf(True)))
        jobs.append((mega.format(4), megafim(4, compiled)))
        jobs.append(("hf eager", hf(False)))
        for name, measure in jobs:
            add(name, measure())
    base = rows.get("hf compiled", rows["hf eager"])["tokens_per_s"]
    for name, row in rows.items():
        row["vs_hf_best"] = row["tokens_per_s"] / base
    rows[mega.format(4)]["vs_n_future_1"] = rows[mega.format(4)]["tokens_per_s"] / rows[mega.format(1)]["tokens_per_s"]
    print(f"{'row':<30}{'tokens/s':>12}{'MFU':>8}{'vs HF best':>12}")
    for name, row in rows.items():
        print(f"{name:<30}{row['tokens_per_s']:>12,.0f}{row['mfu']:>8.1%}{row['vs_hf_best']:>12.2f}")
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
