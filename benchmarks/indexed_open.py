"""What opening an ``IndexedDataset`` costs, and how much of it is the pointer/length range check.

For a synthetic index of N sequences (lengths 1..2048 tokens, contiguous pointers, a sparse ``.bin``
of the right size: only the ``.idx`` is read) the script times ``IndexedDataset(prefix)`` with its
checks on open, the same open without the range check (as it was before that check), the range
check alone (``_check_ranges``: every sequence inside the ``.bin``, document indices never
decreasing), and ``full_check=True`` (contiguity too). The ``.idx`` is in the
page cache (one untimed open first): what a training run sees after preprocessing. Medians of
``--repeats``; the CPU is shared with other jobs, so process CPU time is reported beside wall time.

    .venv/bin/python benchmarks/indexed_open.py [--sizes 1000000 10000000 50000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import command, machine, write_json  # benchmarks/ is this script's folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megafim.data.indexed import HEADER_BYTES, INDEX_MAGIC, IndexedDataset  # noqa: E402


def write_synthetic(prefix: Path, n: int) -> None:
    """An index of ``n`` one-sequence documents (uint16), written in chunks; the .bin is sparse."""
    rng = np.random.default_rng(0)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(struct.pack("<9sQBQQ", INDEX_MAGIC, 1, 8, n, n + 1))
        assert f.tell() == HEADER_BYTES
        lengths = rng.integers(1, 2049, size=n, dtype=np.int32)
        f.write(lengths.tobytes())
        pointers = np.zeros(n, np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * 2, out=pointers[1:])
        f.write(pointers.tobytes())
        end = int(pointers[-1]) + 2 * int(lengths[-1])
        del pointers
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(end)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()``."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def measure(prefix: Path, repeats: int) -> dict:
    IndexedDataset(prefix)  # warm the page cache
    ds = IndexedDataset(prefix)
    bin_size = Path(f"{prefix}.bin").stat().st_size
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    open_wall, open_cpu = timed(lambda: IndexedDataset(prefix), repeats)
    check_wall, check_cpu = timed(lambda: ds._check_ranges(idx, bin_, bin_size), repeats)
    full_wall, full_cpu = timed(lambda: IndexedDataset(prefix, full_check=True), max(1, repeats // 2))
    checked = IndexedDataset._check_ranges
    IndexedDataset._check_ranges = lambda *a: None  # the open as it was before the range check
    try:
        bare_wall, bare_cpu = timed(lambda: IndexedDataset(prefix), repeats)
    finally:
        IndexedDataset._check_ranges = checked
    return {"sequences": len(ds), "idx_mib": round(Path(idx).stat().st_size / 2**20, 1),
            "open_without_range_check_s": bare_wall, "open_without_range_check_cpu_s": bare_cpu,
            "open_s": open_wall, "open_cpu_s": open_cpu, "range_check_s": check_wall,
            "range_check_cpu_s": check_cpu, "full_check_open_s": full_wall, "full_check_open_cpu_s": full_cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "indexed_open.json"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            prefix = Path(tmp) / f"synthetic_{n}"
            write_synthetic(prefix, n)
            rows.append(measure(prefix, args.repeats))
            for suffix in (".bin", ".idx"):
                Path(f"{prefix}{suffix}").unlink()
    print(f"{'sequences':>12} {'.idx MiB':>9} {'open, no range check s':>23} {'open s':>8} {'(cpu)':>7} "
          f"{'range check s':>14} {'(cpu)':>7} {'full_check open s':>18}")
    for r in rows:
        print(f"{r['sequences']:>12,} {r['idx_mib']:>9,.1f} {r['open_without_range_check_s']:>23.3f} "
              f"{r['open_s']:>8.3f} {r['open_cpu_s']:>7.3f} "
              f"{r['range_check_s']:>14.3f} {r['range_check_cpu_s']:>7.3f} {r['full_check_open_s']:>18.3f}")
    write_json(args.json, {"command": command(), "machine": machine(note="2 cores shared with other jobs"),
                           "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
