"""What checking a checkpoint's manifest costs: load time with and without verification (CPU).

    python benchmarks/checkpoint_verify.py [--size 125M --n-future 2 --repeats 5] [--out ...json]

Writes a random model of the named size as a megafim checkpoint (layout-free weights, manifest), then
times, alternating, ``megafim.inference.loading.load_model`` with ``verify=False`` and ``verify=True``
(the checksums computed as the bytes are read, one pass), the earlier two-pass verification (a second
read of every file in a thread beside the load) and ``manifest.verify`` alone (the files are in the
page cache after the first load, as they are for most reloads; a cold read is dominated by the disk).
Reports medians and the ratio (target: verified / unverified <= 1.2). The machine is shared, which
moves the timings.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from report import command, machine, write_json  # noqa: E402  benchmarks/ is this script's folder

from megafim.checkpoint import manifest  # noqa: E402
from megafim.checkpoint.weights import write_weights_checkpoint  # noqa: E402
from megafim.inference.loading import load_model  # noqa: E402
from megafim.model import GPT, model_config  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def two_pass(ckpt: Path) -> None:
    """The earlier verified load, for comparison: ``manifest.verify`` of ``model/`` (a second read of
    every file) in a thread beside an unverified load."""
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(manifest.verify, ckpt, manifest.files_under(ckpt, "model/"))
        load_model(ckpt, verify=False)
        check.result()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="125M")
    p.add_argument("--n-future", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoint_verify.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-verify-"))
    try:
        torch.manual_seed(0)
        model = GPT(model_config(args.size, n_future=args.n_future))
        ckpt = write_weights_checkpoint(work / "save", model.state_dict(), model.config,
                                        yaml.safe_dump({"data": {}}), step=1)
        del model
        mib = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20
        load_model(ckpt, verify=False)  # warm the page cache
        runs: dict[str, list[float]] = {"load": [], "load_verified": [], "load_two_pass": [], "verify_only": []}
        for _ in range(args.repeats):
            runs["load"].append(timed(lambda: load_model(ckpt, verify=False)))
            runs["load_verified"].append(timed(lambda: load_model(ckpt, verify=True)))
            runs["load_two_pass"].append(timed(lambda: two_pass(ckpt)))
            runs["verify_only"].append(timed(lambda: manifest.verify(ckpt)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["load_verified"] / med["load"]
    result = {"benchmark": "checkpoint_verify", "machine": machine("shared with other jobs"),
              "command": command(), "size": args.size, "n_future": args.n_future,
              "checkpoint_mib": round(mib, 1), "repeats": args.repeats,
              "median_s": {k: round(v, 4) for k, v in med.items()},
              "verify_gib_per_s": round(mib / 1024 / med["verify_only"], 2),
              "verified_over_unverified": round(ratio, 3),
              "two_pass_over_unverified": round(med["load_two_pass"] / med["load"], 3),
              "raw_s": {k: [round(x, 4) for x in v] for k, v in runs.items()}}
    print(f"{args.size}: checkpoint {mib:.0f} MiB; median of {args.repeats}")
    print(f"{'load (no verify)':22} {med['load']:8.3f} s")
    print(f"{'load (verified)':22} {med['load_verified']:8.3f} s   ratio {ratio:.2f}")
    two = med["load_two_pass"]
    print(f"{'load (two-pass verify)':22} {two:8.3f} s   ratio {two / med['load']:.2f}")
    print(f"{'manifest.verify alone':22} {med['verify_only']:8.3f} s   "
          f"{mib / 1024 / med['verify_only']:.2f} GiB/s")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
