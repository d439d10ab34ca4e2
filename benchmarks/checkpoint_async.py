"""Synchronous against asynchronous saves of a whole training state (DeepSpeed's files, the sharded
``model/``, RNG, trainer state), in the trainer itself on gloo ranks on the CPU.

    python benchmarks/checkpoint_async.py [--size 125M --n-layers N --tp 2 --pp 2 --iters 6 --interval 2]
                                          [--out ...json]

Builds a small tokenizer and dataset from the standard library (as the tests do), then trains the named
model size (its vocabulary is the tokenizer's 512 tokens, not the size's own) twice with
``torchrun``, saving every ``--interval`` steps: once synchronously, once with ``--async-save``.
From the trainer's log it reads how long each save held the training loop (sync: the whole save;
async: the save call, which hands the state to the writer thread, plus the time the next optimizer
step waited for the writer's host copy; the last save, after which no step runs, is left out) and how
long the background copy and writes took; from ``metrics.jsonl`` the
time of the steps that ran while a write was pending. While each run trains, the resident memory of
every rank is sampled every 20 ms (its peak is over the whole run: training, the saves and, with
``--async-save``, the host copy). The state each rank writes is the sum of its files in the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import command, machine, write_json  # noqa: E402  benchmarks/ is this script's folder


def build_data(work: Path) -> tuple[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / name) for name in ("json", "email", "collections", "asyncio")]
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", *inputs[:3], "--vocab-size", "512",
                    "--output-prefix", str(work / "tok")], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", *inputs, "--output-prefix",
                    str(work / "data"), "--tokenizer-model", str(work / "tok.model"), "--append-eod", "--quiet"],
                   cwd=ROOT, check=True, capture_output=True)
    return str(work / "data_text_document"), str(work / "tok.model")


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sample_ranks(agent: subprocess.Popen, peaks: dict[int, int], stop: threading.Event) -> None:
    while not stop.is_set():
        out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, out):
            peaks[pid] = max(peaks.get(pid, 0), rss_of(pid))
        time.sleep(0.02)


def async_stalls(log: str) -> tuple[list[float], list[float]]:
    """(seconds each --async-save save call took, seconds the next optimizer step waited for its copy),
    from rank 0's log lines in order; a save with no step after it has no wait."""
    handed, waited = [], []
    for line in log.splitlines():
        if m := re.search(r"checkpoint: \S+ handed to the writer in ([0-9.]+) s", line):
            handed.append(float(m.group(1)))
        elif m := re.search(r"the optimizer step waited ([0-9.]+) s for the host copy", line):
            waited.append(float(m.group(1)))
    return handed, waited


def train(args, data, tok, save: Path, background: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp * args.pp}",
           "-m", "megafim.train", "--config", str(ROOT / "examples/configs/tiny.yaml"), "--data-path", data,
           "--tokenizer-model", tok, "--set", f"model.size={args.size}", "--n-future", str(args.n_future),
           "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", str(args.pp),
           "--tensor-model-parallel-size", str(args.tp), "--pipeline-model-parallel-size", str(args.pp),
           "--zero-stage", "1", "--train-iters", str(args.iters), "--save-interval", str(args.interval),
           "--save", str(save), "--set", "logging.tensorboard=false", "--set", "logging.log_interval=1",
           "--set", "checkpoint.keep_last=0", "--set", "schedule.warmup_iters=0"]
    cmd += ["--set", f"model.n_layers={args.n_layers}"] if args.n_layers else []
    cmd += ["--async-save"] if background else []
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_ranks, args=(agent, peaks, stop), daemon=True)
    sampler.start()
    out, _ = agent.communicate()
    stop.set()
    sampler.join()
    if agent.returncode != 0:
        raise SystemExit(f"training failed (exit {agent.returncode}):\n{out[-4000:]}")
    held = [float(x) for x in re.findall(r"checkpoint: saved \S+ in ([0-9.]+) s", out)]
    handed, waited = async_stalls(out)
    held += [call + wait for call, wait in zip(handed, waited)]
    written = [float(x) for x in re.findall(r"written in the background in ([0-9.]+) s", out)]
    steps = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    after_save = [s["step_time_s"] for s in steps if s["step"] % args.interval == 1 and s["step"] > 1]
    others = [s["step_time_s"] for s in steps if s["step"] > 1 and s["step"] % args.interval != 1]
    ckpt = save / f"step_{args.interval:08d}"
    files = {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    return {"save_held_loop_s": held, "save_call_s": handed, "step_waited_for_copy_s": waited,
            "background_write_s": written,
            "step_s_after_save": [round(x, 3) for x in after_save], "step_s_other": [round(x, 3) for x in others],
            "rank_peak_rss_mib": [round(peaks[p] / 2**20, 1) for p in sorted(peaks)],
            "checkpoint_mib": round(sum(files.values()) / 2**20, 1),
            "ds_files_mib": {k: round(v / 2**20, 1) for k, v in files.items() if k.startswith("ds/")},
            "model_files_mib": {k: round(v / 2**20, 1) for k, v in files.items() if k.endswith(".safetensors")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="125M")
    p.add_argument("--n-future", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=0, help="fewer trunk layers than the size has (0: its own)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--interval", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoint_async.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-async-"))
    try:
        data, tok = build_data(work)
        runs = {kind: train(args, data, tok, work / kind, kind == "async") for kind in ("sync", "async")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sync_s = statistics.median(runs["sync"]["save_held_loop_s"])
    async_s = statistics.median(runs["async"]["save_held_loop_s"])
    result = {"benchmark": "checkpoint_async", "machine": machine("shared with other jobs"),
              "command": command(), "size": args.size,
              "n_layers": args.n_layers or "the size's", "vocab": 512,
              "n_future": args.n_future, "tp": args.tp, "pp": args.pp, "zero_stage": 1,
              "iters": args.iters, "interval": args.interval,
              "median_save_held_loop_s": {"sync": sync_s, "async": async_s},
              "async_stall_over_sync_save": round(async_s / sync_s, 3), "runs": runs}
    layers = f", {args.n_layers} trunk layers" if args.n_layers else ""
    print(f"{args.size} (vocab 512{layers}), tp {args.tp} x pp {args.pp}, ZeRO-1, saves every {args.interval} of "
          f"{args.iters} steps; checkpoint {runs['sync']['checkpoint_mib']} MiB")
    print(f"{'':6} {'loop held s':>12} {'bg write s':>11} {'step after save s':>18} {'other steps s':>14} "
          f"{'peak RSS per rank MiB':>24}")
    for kind, r in runs.items():
        bg = f"{statistics.median(r['background_write_s']):.2f}" if r["background_write_s"] else "-"
        print(f"{kind:6} {statistics.median(r['save_held_loop_s']):12.2f} {bg:>11} "
              f"{statistics.median(r['step_s_after_save'] or [0]):18.2f} "
              f"{statistics.median(r['step_s_other'] or [0]):14.2f} "
              f"{' '.join(f'{m:.0f}' for m in r['rank_peak_rss_mib']):>24}")
    print(f"async stall / sync save: {result['async_stall_over_sync_save']:.3f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
