"""Peak memory of the Hugging Face converters on a model many shards large (CPU).

    python benchmarks/convert_memory.py [--size 125M --n-future 2 --shard-mb 50 --repeats 3] [--out ...json]

Writes a random model of the named size as a megafim checkpoint (in a child process), then runs,
each in a fresh process whose peak RSS comes from ``os.wait4``:
- baseline: ``python tools/convert_checkpoint_to_hf.py --help`` (Python, torch and the imports);
- export:   ``tools/convert_checkpoint_to_hf.py --load CKPT --save HF --max-shard-size-gb SHARD``;
- import:   ``tools/convert_hf_to_checkpoint.py --load HF --save BACK --n-future N+2`` (two fresh heads).
Reports peak RSS above the baseline against the model's size and the shard size: streaming means the
extra memory stays near one shard (or one layer), not the model. Medians over --repeats runs; the
machine is shared, which moves timings, not peak RSS much.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import command, machine, write_json  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]

WRITE_CHECKPOINT = """
import sys, torch, yaml
from pathlib import Path
from megafim.checkpoint.weights import write_weights_checkpoint
from megafim.model import GPT, model_config
size, n_future, save = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
torch.manual_seed(0)
model = GPT(model_config(size, n_future=n_future))
write_weights_checkpoint(save, model.state_dict(), model.config, yaml.safe_dump({"data": {}}), step=1)
print(sum(p.numel() for p in model.parameters()))
"""


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one command run in its own process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"convert_memory: {' '.join(cmd)} failed ({code}):\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def dir_mib(path: Path, pattern: str = "*.safetensors") -> float:
    return sum(p.stat().st_size for p in path.rglob(pattern)) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="125M", help="model size from megafim/model/registry.py")
    p.add_argument("--n-future", type=int, default=2)
    p.add_argument("--shard-mb", type=float, default=50.0, help="--max-shard-size-gb of the export, in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/convert_memory.json")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="convert_memory-"))
    py = sys.executable
    ckpt, hf, back = work / "ckpt", work / "hf", work / "back"
    try:
        shutil.rmtree(ckpt, ignore_errors=True)
        written = subprocess.run([py, "-c", WRITE_CHECKPOINT, args.size, str(args.n_future), str(ckpt)], cwd=ROOT,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
        if written.returncode:
            raise SystemExit(f"convert_memory: writing the checkpoint failed:\n{written.stderr[-2000:]}")
        n_params = int(written.stdout.split()[-1])
        commands = {
            "baseline": [py, "tools/convert_checkpoint_to_hf.py", "--help"],
            "export": [py, "tools/convert_checkpoint_to_hf.py", "--load", str(ckpt), "--save", str(hf),
                       "--dtype", "float32", "--max-shard-size-gb", str(args.shard_mb / 1024)],
            "import": [py, "tools/convert_hf_to_checkpoint.py", "--load", str(hf), "--save", str(back),
                       "--n-future", str(args.n_future + 2)],
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                if name == "import":
                    shutil.rmtree(back, ignore_errors=True)
                runs[name].append(peak_rss(cmd))
        model_mib = dir_mib(ckpt)
        shards = sorted(hf.glob("model-*.safetensors"))
        largest_shard = max(p.stat().st_size for p in shards) / 2**20
        med = {name: {"peak_rss_mib": statistics.median(r[0] for r in rs),
                      "seconds": statistics.median(r[1] for r in rs)} for name, rs in runs.items()}
        base = med["baseline"]["peak_rss_mib"]
        rows = []
        for name in ("export", "import"):
            extra = med[name]["peak_rss_mib"] - base
            rows.append({"step": name, "peak_rss_mib": round(med[name]["peak_rss_mib"], 1),
                         "above_baseline_mib": round(extra, 1), "seconds": round(med[name]["seconds"], 2),
                         "above_baseline_over_model": round(extra / model_mib, 3),
                         "above_baseline_over_largest_shard": round(extra / largest_shard, 2)})
        result = {
            "benchmark": "convert_memory",
            "machine": machine("shared with other jobs"),
            "command": command(),
            "model": {"size": args.size, "n_future": args.n_future, "parameters": n_params,
                      "checkpoint_mib": round(model_mib, 1), "hf_shards": len(shards),
                      "largest_shard_mib": round(largest_shard, 1),
                      "mtp_heads_mib": round(dir_mib(hf, "mtp_heads.safetensors"), 1)},
            "baseline_peak_rss_mib": round(base, 1),
            "repeats": args.repeats,
            "medians": rows,
            "raw": {name: [[round(a, 1), round(b, 2)] for a, b in rs] for name, rs in runs.items()},
        }
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.size} model, {n_params / 1e6:.0f}M parameters, checkpoint {model_mib:.0f} MiB, "
          f"{len(shards)} HF shards of <= {largest_shard:.0f} MiB; baseline (imports) {base:.0f} MiB")
    print(f"{'step':8} {'peak MiB':>9} {'above base':>11} {'/ model':>8} {'/ shard':>8} {'s':>7}")
    for r in rows:
        print(f"{r['step']:8} {r['peak_rss_mib']:9.0f} {r['above_baseline_mib']:11.0f} "
              f"{r['above_baseline_over_model']:8.2f} {r['above_baseline_over_largest_shard']:8.2f} {r['seconds']:7.1f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
