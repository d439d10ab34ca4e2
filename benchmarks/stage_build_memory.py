"""Host memory and time for one rank to build its pipeline stage, against building the whole model first.

    python benchmarks/stage_build_memory.py [--sizes 1.3B 7B] [--pp 4] [--out ...json]

"meta" is what the trainer does (``training.build.build_stage``): the model laid out on the meta device,
cut to the stage, and its weights made one whole parameter at a time. "whole" is the old way, kept here
as the baseline: ``torch.manual_seed(seed); PipelineStage(GPT(config), plan)`` builds every weight of
the model, then drops the other stages'. The stage is the last of ``--pp`` (it holds the heads, the norm
and the unembedding). Each build runs in a process of its own, so its peak RSS (``ru_maxrss``, which
includes the ~0.4 GiB of importing torch) is its own; "whole" is skipped where the whole model in fp32
would not fit in this machine's memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from report import command, machine, memory_gib, write_json  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_once(mode: str, size: str, pp: int) -> dict:
    """Runs in the child process: build the stage, report parameters, peak RSS and seconds."""
    import torch

    from megafim.model import GPT, model_config
    from megafim.training.build import PipelineStage, build_stage, plan_stages

    torch.set_num_threads(1)
    mc = model_config(size)
    plan = plan_stages(mc.n_trunk_layers, mc.n_future, pp)[-1]
    t = time.perf_counter()
    if mode == "whole":
        torch.manual_seed(0)
        stage = PipelineStage(GPT(mc), plan)
    else:
        stage = build_stage(mc, plan, 0)
    seconds = time.perf_counter() - t
    n = sum(p.numel() for p in stage.parameters())
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB
    return {"mode": mode, "size": size, "pp": pp, "stage_params": n, "stage_gib": n * 4 / 2**30,
            "model_params": mc.num_parameters(), "peak_rss_gib": peak_gib, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["1.3B", "7B"])
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage_build_memory.json"))
    p.add_argument("--child", nargs=3, metavar=("MODE", "SIZE", "PP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(build_once(args.child[0], args.child[1], int(args.child[2]))))
        return 0

    from megafim.model import model_config

    total_gib = memory_gib()
    rows = []
    for size in args.sizes:
        for mode in ("whole", "meta"):
            if mode == "whole" and model_config(size).num_parameters() * 4 / 2**30 > 0.8 * total_gib:
                rows.append({"mode": mode, "size": size, "pp": args.pp,
                             "skipped": "the whole model does not fit"})
                continue
            out = subprocess.run([sys.executable, __file__, "--child", mode, size, str(args.pp)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"last of {args.pp} pipeline stages, one rank, fp32 on the CPU (1 thread)")
    print(f"{'model':<7}{'build':<7}{'stage params':>14}{'stage GiB':>11}{'peak RSS GiB':>14}{'seconds':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['size']:<7}{r['mode']:<7}  skipped: {r['skipped']} ({total_gib:.0f} GiB here)")
            continue
        print(f"{r['size']:<7}{r['mode']:<7}{r['stage_params'] / 1e6:>13.0f}M{r['stage_gib']:>11.2f}"
              f"{r['peak_rss_gib']:>14.2f}{r['seconds']:>9.1f}")
    result = {"benchmark": "stage_build_memory",
              "command": command(),
              "machine": machine(),
              "rows": rows}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
