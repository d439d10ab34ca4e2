"""Peak activation memory per rank of one forward + backward at seq 8192: cp = 2 vs cp = 1 (CPU, gloo).

Each layout runs under torchrun in fresh processes. A rank builds the tiny model (n_future = 4),
splits the batch as the trainer does (its two chunks, the layout with ~10 documents per context and
the document mask, the heads' targets), then resets the kernel's peak-RSS mark (/proc/self/clear_refs)
and runs forward + backward. Peak activation memory = peak RSS during the step (VmHWM) minus RSS just
before it; glibc is told to map every allocation over 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so
freed tensors leave the RSS at once. Target: cp = 2 / cp = 1 <= 0.55.

    python benchmarks/context_parallel_memory.py [--seq 8192 --out benchmarks/results/context_parallel_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET = 0.55


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(seq: int, docs: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from megafim.model import GPT, model_config
    from megafim.model.documents import Documents, token_layout
    from megafim.parallel import ParallelDims
    from megafim.parallel.context_parallel import apply_context_parallel, gathered_positions, local_positions
    from megafim.training.distributed import WorldInfo, init_distributed
    from document_attention import random_documents

    init_distributed(WorldInfo.from_env(), "gloo")
    dims = ParallelDims.build(cp=dist.get_world_size())
    torch.manual_seed(0)
    model = apply_context_parallel(GPT(model_config("tiny", n_future=4, max_seq_len=seq)), dims)
    tokens = torch.randint(0, model.config.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(1))
    seg, label_seg = random_documents(1, seq, seq // docs)
    documents = Documents(seg, label_seg)
    local = keys = None
    if dims.cp > 1:
        local, keys = local_positions(seq, dims.cp, dims.cp_rank), gathered_positions(seq, dims.cp)
    layout = token_layout(documents, seq, query_index=local, key_index=keys)
    targets = model.targets(tokens[:, 1:], None, documents)
    x = tokens[:, :-1]
    if local is not None:
        targets, x = targets.select(local), x[:, local]
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _status_kib("VmRSS")
    loss, _ = model.loss_from_trunk(model.trunk(model.embed(x), layout=layout), targets, layout=layout)
    loss.backward()
    peak = _status_kib("VmHWM")
    row = {"cp": dims.cp, "rank": dims.rank, "rss_before_mib": round(before / 1024, 1),
           "peak_activation_mib": round((peak - before) / 1024, 1)}
    Path(f"{out}.{dims.rank}").write_text(json.dumps(row))
    dist.destroy_process_group()


def run_layout(cp: int, seq: int, docs: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}", __file__,
               "--worker", "--seq", str(seq), "--docs", str(docs), "--worker-out", out]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(cp)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--docs", type=int, default=10, help="documents per context")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "context_parallel_memory.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.seq, args.docs, args.worker_out)
        return 0
    import torch  # noqa: F401  (so that machine() names its version)
    from report import command, machine, write_json

    rows = {cp: run_layout(cp, args.seq, args.docs) for cp in (1, 2)}
    one = rows[1][0]["peak_activation_mib"]
    worst = max(r["peak_activation_mib"] for r in rows[2])
    for cp, ranks in rows.items():
        for r in ranks:
            print(f"cp {cp} rank {r['rank']}: peak activation {r['peak_activation_mib']:8.1f} MiB")
    print(f"cp=2 / cp=1 (worst rank): {worst / one:.3f} (target <= {TARGET})")
    write_json(args.out, {"command": command(),
                          "machine": machine(note="2 shared CPU cores; peak RSS during the step"),
                          "seq": args.seq, "model": "tiny, n_future=4, document mask",
                          "rows": [r for ranks in rows.values() for r in ranks],
                          "ratio": round(worst / one, 3), "target_ratio_max": TARGET, "met": worst / one <= TARGET})
    return 0


if __name__ == "__main__":
    sys.exit(main())
