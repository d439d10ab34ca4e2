"""Per-rank memory and time of writing the layout-free weights: sharded (each rank writes its own
slices, this package) against gathered (each stage's tensor rank 0 gathers the stage's full tensors and
writes them, what format 1 did), on gloo ranks on the CPU.

    python benchmarks/checkpoint_save.py [--size 125M --tp 2 --pp 2 --repeats 3] [--out ...json]

Starts ``tp x pp`` ranks with torchrun; each builds its stage of a random model of the named size
(megafim.training.build.build_stage), then, alternating, times a save of each kind into a fresh
directory and samples its resident memory every 2 ms during the save. Reports per rank: the shard's
bytes, the peak resident memory above the one before the save, and the wall time (medians). Only the
``model/`` part of a checkpoint is measured: DeepSpeed's ``ds/`` files are the same in both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class PeakRss:
    """Peak resident set size (bytes) seen by a sampling thread while the block runs."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gathered_save(folder: Path, stage, dims) -> None:
    """Format 1's writer, kept here as the baseline: full tensors gathered onto tensor rank 0."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    full = {}
    for name, param in stage.full_state_names().items():
        if dims.tp > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(param) for _ in range(dims.tp)]
            dist.all_gather(parts, param.detach().contiguous(), group=dims.tp_group)
            full[name] = torch.cat(parts, dim=param.partition_dim)
        else:
            full[name] = param.detach().clone()
    if dims.tp_rank == 0:
        save_file(full, str(folder / f"stage_{dims.pp_rank:02d}.safetensors"))


def sharded_save(folder: Path, stage, dims) -> None:
    from megafim.checkpoint.engine import stage_slices
    from megafim.checkpoint.sharded import write_shard
    from megafim.checkpoint.weights import shard_name

    state, placement = stage_slices(stage, dims, zero_stage=1)
    write_shard(folder, shard_name(dims.tp_rank, dims.pp_rank), state, placement)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megafim.model import model_config
    from megafim.parallel import ParallelDims
    from megafim.training.build import build_stage, plan_stages

    dist.init_process_group("gloo")
    dims = ParallelDims.build(tp=args.tp, pp=args.pp)
    mc = model_config(args.size, n_future=args.n_future)
    stage = build_stage(mc, plan_stages(mc.n_trunk_layers, mc.n_future, dims.pp)[dims.pp_rank], 1, dims)
    own = sum(p.numel() * p.element_size() for p in stage.parameters())
    runs = {"sharded": [], "gathered": []}
    for i in range(args.repeats):
        for kind, fn in (("sharded", sharded_save), ("gathered", gathered_save)):
            folder = Path(args.work) / f"{kind}-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            before = rss()
            t0 = time.perf_counter()
            with PeakRss() as peak:
                fn(folder, stage, dims)
            seconds = time.perf_counter() - t0
            dist.barrier()
            runs[kind].append((peak.peak - before, seconds))
            if dims.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            dist.barrier()
    rows = [None] * dims.world_size
    dist.all_gather_object(rows, {"rank": dims.rank, "tp_rank": dims.tp_rank, "pp_rank": dims.pp_rank,
                                  "shard_mib": round(own / 2**20, 1), "runs": runs})
    if dims.rank == 0:
        report(args, rows)
    dist.barrier()
    dist.destroy_process_group()


def report(args, rows) -> None:
    import torch  # noqa: F401  (machine() reports its version)
    from report import machine, write_json

    table = []
    for r in rows:
        row = {k: r[k] for k in ("rank", "tp_rank", "pp_rank", "shard_mib")}
        for kind, runs in r["runs"].items():
            row[f"{kind}_peak_above_mib"] = round(statistics.median(m for m, _ in runs) / 2**20, 1)
            row[f"{kind}_s"] = round(statistics.median(s for _, s in runs), 3)
        table.append(row)
    print(f"{args.size}, tp {args.tp} x pp {args.pp}; medians of {args.repeats}; "
          "MiB above the memory before the save")
    print(f"{'rank':>4} {'shard MiB':>10} {'sharded MiB':>12} {'gathered MiB':>13} {'sharded s':>10} "
          f"{'gathered s':>11}")
    for r in table:
        print(f"{r['rank']:4d} {r['shard_mib']:10.1f} {r['sharded_peak_above_mib']:12.1f} "
              f"{r['gathered_peak_above_mib']:13.1f} {r['sharded_s']:10.3f} {r['gathered_s']:11.3f}")
    write_json(args.out, {"benchmark": "checkpoint_save", "machine": machine("shared with other jobs"),
                          "command": args.command, "size": args.size, "tp": args.tp, "pp": args.pp,
                          "repeats": args.repeats, "ranks": table,
                          "raw": [{"rank": r["rank"], **r["runs"]} for r in rows]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="125M")
    p.add_argument("--n-future", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoint_save.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--command", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from report import command as report_command  # the module; this file's report() is the table

    work = tempfile.mkdtemp(prefix="ckpt-save-")
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.tp * args.pp}",
               __file__, "--worker", "--work", work, "--command", report_command(),
               *sys.argv[1:]]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TMPDIR=work)
        subprocess.run(cmd, check=True, env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
