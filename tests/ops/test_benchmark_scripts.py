"""The GPU benchmark scripts cannot be measured here, but every code path they take runs on tiny CPU
shapes with --smoke-cpu; without CUDA and without that flag they must refuse loudly (exit 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["benchmarks/linear_cross_entropy.py", "benchmarks/train_step_memory.py"]


def _run(script, *args, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", TMPDIR=str(tmp_path))
    return subprocess.run([sys.executable, str(REPO / script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("script", SCRIPTS)
def test_refuses_loudly_without_cuda(script, tmp_path):
    proc = _run(script, "--out", str(tmp_path / "out.json"), tmp_path=tmp_path)
    assert proc.returncode == 2 and "SKIP" in proc.stderr and "CUDA" in proc.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_on_cpu(script, tmp_path):
    out = tmp_path / "out.json"
    extra = ["--reps", "2"] if script.endswith("linear_cross_entropy.py") else []
    proc = _run(script, "--smoke-cpu", *extra, "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "smoke" in doc["machine"]["device"] and doc["command"]
    if "correctness" in doc:  # linear_cross_entropy: the float64 check ran and the impls agree on the loss
        assert all(v["ok"] for v in doc["correctness"].values())
        for (vocab, n), losses in _losses_by_case(doc["results"]).items():
            assert max(losses) - min(losses) < 1e-3 * max(losses), (vocab, n, losses)
    else:
        assert [r["n_future"] for r in doc["results"]] == [1, 4]
        assert [len(r["head_losses"]) for r in doc["results"]] == [1, 4]


def _losses_by_case(rows):
    cases = {}
    for row in rows:
        if "loss" in row:
            cases.setdefault((row["vocab"], row["n_heads"]), []).append(row["loss"])
    return cases
