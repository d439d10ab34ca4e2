"""Index build time and peak memory for 10 million samples of 2048 (+1) tokens.

Side by side in one run:
- megafim: ``build_gpt_index`` (C++ document order, sample index and per-epoch sample shuffle).
- megatron-style: what megatron-core's GPTDataset does, written here from its public pieces: the
  document index tiled over epochs and shuffled with numpy's RandomState, megatron-core's prebuilt
  C++ ``build_sample_idx``, and a RandomState shuffle of the samples (skipped when megatron-core is
  not installed).

Two synthetic corpora (document lengths log-normal, mean ~700 tokens): "large" holds more than the
20.5B tokens asked for (under one epoch), "small" holds 0.7B tokens (about 30 epochs). Each build
runs in a fresh subprocess; wall and CPU time (process_time: less disturbed by other jobs) are
reported; peak memory is the process's peak RSS above what it held before the build
(Linux VmHWM, reset through /proc/self/clear_refs). The CPU is shared with other jobs: builds are
repeated and medians reported.

    .venv/bin/python benchmarks/sample_index.py [--repeats 3] [--num-samples 10000000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from report import command, machine, write_json  # benchmarks/ is this script's folder

REPO = Path(__file__).resolve().parents[1]
CORPORA = {"large": 32_000_000, "small": 1_000_000}  # documents
SEQ_LENGTH = 2048


def synthetic_sizes(num_docs: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    sizes = rng.lognormal(mean=6.0, sigma=1.0, size=num_docs)  # mean e^(6.5) ~ 665 tokens
    return np.clip(sizes, 1, 200_000).astype(np.int32)


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak includes the synthetic corpus; the report says the baseline


def _megatron_helpers():
    """megatron-core's compiled helpers, loaded without importing the (slow) megatron package."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "core" / "datasets"
    found = sorted(folder.glob("helpers_cpp*.so"))
    if not found:
        return None
    loader_spec = importlib.util.spec_from_file_location("helpers_cpp", found[0])
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def build_megatron_style(sizes: np.ndarray, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    helpers = _megatron_helpers()
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    num_epochs = 1
    while (num_epochs * tokens_per_epoch - 1) // SEQ_LENGTH < num_samples:
        num_epochs += 1
    state = np.random.RandomState(seed)
    doc_index = np.tile(np.arange(len(sizes), dtype=np.int32), num_epochs)
    state.shuffle(doc_index)
    sample_index = helpers.build_sample_idx_int32(sizes, doc_index, SEQ_LENGTH, num_epochs,
                                                  tokens_per_epoch, True, 1)
    shuffle_index = np.arange(len(sample_index) - 1, dtype=np.uint32)
    state.shuffle(shuffle_index)
    return {"doc_order": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def worker(impl: str, corpus: str, num_samples: int) -> dict:
    sizes = synthetic_sizes(CORPORA[corpus])
    if impl == "megafim":
        from megafim.data.gpt_dataset import build_gpt_index

        def build():
            return build_gpt_index(sizes, (0, len(sizes)), SEQ_LENGTH, num_samples, seed=1234)
    else:
        def build():
            return build_megatron_style(sizes, num_samples, seed=1234)
    base = _vm_hwm_bytes()
    _reset_peak()
    base_after_reset = _vm_hwm_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    arrays = build()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _vm_hwm_bytes()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_extra_bytes": peak - base_after_reset,
            "peak_reset_worked": base_after_reset < base or base_after_reset == peak,
            "output_bytes": int(sum(a.nbytes for a in arrays.values())),
            "tokens_per_epoch": int(sizes.sum(dtype=np.int64)),
            "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}}


def run_one(impl: str, corpus: str, num_samples: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, corpus, "--num-samples", str(num_samples)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=10_000_000)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "CORPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.num_samples)))
        return
    impls = ["megafim"] + (["megatron-style"] if _megatron_helpers() is not None else [])
    rows = []
    for corpus in CORPORA:
        for impl in impls:
            runs = [run_one(impl, corpus, args.num_samples) for _ in range(args.repeats)]
            rows.append({"corpus": corpus, "documents": CORPORA[corpus], "impl": impl,
                         "seconds_median": statistics.median(r["seconds"] for r in runs),
                         "seconds_all": [round(r["seconds"], 3) for r in runs],
                         "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in runs),
                         "peak_extra_MiB_median": statistics.median(r["peak_extra_bytes"] for r in runs) / 2**20,
                         "output_MiB": runs[0]["output_bytes"] / 2**20,
                         "tokens_per_epoch": runs[0]["tokens_per_epoch"], "arrays": runs[0]["arrays"]})
    print(f"{'corpus':7} {'impl':15} {'wall s':>7} {'cpu s':>6} {'peak MiB':>9} {'output MiB':>11}  wall runs")
    for r in rows:
        print(f"{r['corpus']:7} {r['impl']:15} {r['seconds_median']:7.2f} {r['cpu_seconds_median']:6.2f} "
              f"{r['peak_extra_MiB_median']:9.0f} {r['output_MiB']:11.0f}  {r['seconds_all']}")
    ratios = {}
    for corpus in CORPORA:
        by = {r["impl"]: r for r in rows if r["corpus"] == corpus}
        if "megatron-style" in by:
            ratios[corpus] = {
                "time_megatron_over_megafim": by["megatron-style"]["seconds_median"] / by["megafim"]["seconds_median"],
                "cpu_megatron_over_megafim":
                    by["megatron-style"]["cpu_seconds_median"] / by["megafim"]["cpu_seconds_median"],
                "peak_megatron_over_megafim":
                    by["megatron-style"]["peak_extra_MiB_median"] / by["megafim"]["peak_extra_MiB_median"]}
    print(json.dumps(ratios, indent=1))
    result = {"benchmark": "sample_index", "command": command(),
              "machine": machine("shared CPU: other jobs ran at the same time; medians of repeats"),
              "seq_length": SEQ_LENGTH, "num_samples": args.num_samples, "repeats": args.repeats,
              "rows": rows, "ratios": ratios}
    write_json(REPO / "benchmarks" / "results" / "sample_index.json", result)


if __name__ == "__main__":
    main()
