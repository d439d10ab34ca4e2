"""A whole training step of the 1.3B model with n = 4 future heads vs n = 1, same total layers (GPU only).

Step = forward (trunk, then ``multi_token_loss`` running the heads one by one), one backward, AdamW
step, bf16 weights. n = 1 has 23 trunk layers + 1 head; n = 4 has 20 + 4 (24 blocks each). Reports
the peak memory (torch.cuda.max_memory_allocated over the step, absolute and above weights +
optimizer state) and tokens/s (median over timed steps), and the issue's targets: peak within 1.15x
and tokens/s within 0.9x of n = 1.

    python benchmarks/train_step_memory.py [--batch 4 --seq 2048 --steps 5] [--out ...json]

Exits 2 with a SKIP message when CUDA is absent (nothing is measured). ``--smoke-cpu`` runs the same
code on the tiny model on the CPU (checks the script; its numbers mean nothing and it says so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megafim.model import GPT, model_config  # noqa: E402
from report import command, machine, write_json  # noqa: E402

TOTAL_BLOCKS = 24  # the 1.3B shape's layers; n_layers = TOTAL_BLOCKS - (n - 1) keeps trunk + heads equal
TARGETS = {"peak_memory_ratio_max": 1.15, "tokens_per_s_ratio_min": 0.9}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        print("SKIP benchmarks/train_step_memory.py: needs a CUDA GPU and torch.cuda.is_available() is "
              "False; nothing was measured", file=sys.stderr)
        sys.exit(2)


def build(size: str, n_future: int, total_blocks: int, seq: int, device: str, dtype: torch.dtype):
    config = model_config(size, n_future=n_future, n_layers=total_blocks - (n_future - 1),
                          max_seq_len=max(seq, model_config(size).max_seq_len))
    torch.manual_seed(0)
    model = GPT(config).to(device=device, dtype=dtype)
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    return config, model, optimizer


def train_step(model, optimizer, tokens, labels, mask) -> torch.Tensor:
    out = model(tokens, labels, mask)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.head_losses


def run(size: str, n_future: int, total_blocks: int, batch: int, seq: int, steps: int, device: str) -> dict:
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config, model, optimizer = build(size, n_future, total_blocks, seq, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device, generator=gen)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    mask = torch.ones(batch, seq, device=device)
    train_step(model, optimizer, inputs, labels, mask)  # warm-up: optimizer state, Triton, cuBLAS
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0  # weights + AdamW state
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        head_losses = train_step(model, optimizer, inputs, labels, mask)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    result = {
        "n_future": n_future, "n_layers": config.n_layers, "trunk_blocks": config.n_trunk_layers,
        "parameters": sum(p.numel() for p in model.parameters()), "batch": batch, "seq": seq,
        "median_step_s": statistics.median(times), "step_times_s": times,
        "tokens_per_s": batch * seq / statistics.median(times),
        "peak_gib": peak / 2**30, "resident_gib": resident / 2**30, "peak_above_resident_gib": (peak - resident) / 2**30,
        "head_losses": [round(x, 4) for x in head_losses.float().tolist()],
    }
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_step_memory.json")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="the tiny model on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    if args.smoke_cpu:
        print("SMOKE RUN ON CPU: the tiny model through every code path; not a measurement", flush=True)
        size, total_blocks, device, device_name = "tiny", 5, "cpu", "cpu (smoke run: the numbers mean nothing)"
        args.batch, args.seq, args.steps = 2, 16, 2
    else:
        require_cuda()
        size, total_blocks, device, device_name = "1.3B", TOTAL_BLOCKS, "cuda", torch.cuda.get_device_name(0)
    print(f"device: {device_name}; model {size}, {total_blocks} blocks, batch {args.batch} x seq {args.seq}")
    rows = []
    for n in (1, 4):
        row = run(size, n, total_blocks, args.batch, args.seq, args.steps, device)
        rows.append(row)
        print(f"n={n}: {row['tokens_per_s']:10.0f} tokens/s  peak {row['peak_gib']:6.2f} GiB  "
              f"(weights+AdamW {row['resident_gib']:.2f} GiB, above them {row['peak_above_resident_gib']:.2f} GiB)  "
              f"head losses {row['head_losses']}", flush=True)
    one, four = rows
    summary = {"peak_memory_ratio_n4_over_n1": four["peak_gib"] / one["peak_gib"],
               "tokens_per_s_ratio_n4_over_n1": four["tokens_per_s"] / one["tokens_per_s"]}
    summary["target_peak_memory"] = summary["peak_memory_ratio_n4_over_n1"] <= TARGETS["peak_memory_ratio_max"]
    summary["target_tokens_per_s"] = summary["tokens_per_s_ratio_n4_over_n1"] >= TARGETS["tokens_per_s_ratio_min"]
    print(json.dumps(summary, indent=1))
    doc = {"benchmark": "train_step_memory", "command": command(),
           "machine": machine(device=device_name),
           "model": size, "total_blocks": total_blocks, "targets": TARGETS, "results": rows, "summary": summary}
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
