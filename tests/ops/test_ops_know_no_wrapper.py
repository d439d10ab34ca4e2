"""megafim/ops holds kernels and losses over plain tensors: no DeepSpeed imports or internals (ZeRO-3's
partitioned parameters reach ``multi_token_loss`` through its ``PartitionedParams`` interface, which
megafim/parallel/zero3.py implements)."""

import re
from pathlib import Path

OPS = Path(__file__).resolve().parents[2] / "megafim" / "ops"
# The word itself, and the attributes DeepSpeed puts on a ZeRO-3 parameter (ds_id, ds_status, ...).
FORBIDDEN = re.compile(r"deepspeed|\bds_[a-z_]+", re.IGNORECASE)


def test_ops_mentions_no_deepspeed():
    files = sorted(OPS.rglob("*.py"))
    assert len(files) >= 3, f"no sources found under {OPS}"
    hits = [f"{path.relative_to(OPS.parent.parent)}:{n}: {line.strip()}"
            for path in files for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert not hits, "megafim/ops must not depend on DeepSpeed:\n" + "\n".join(hits)
