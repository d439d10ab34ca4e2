"""benchmarks/document_attention.py --gpu cannot be measured here: it must refuse without CUDA (exit 2,
nothing written), and its code must run on tiny CPU shapes with --smoke-cpu."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "document_attention.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_benchmark_refuses_without_cuda(tmp_path):
    proc = _run("--gpu", "--out", str(tmp_path / "out.json"))
    assert proc.returncode == 2 and "SKIP" in proc.stderr and "CUDA" in proc.stderr
    assert not (tmp_path / "out.json").exists()


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "out.json"
    proc = _run("--gpu", "--smoke-cpu", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "smoke" in doc["machine"]["note"] and doc["rows"][0]["seq"] == 512 and doc["rows"][0]["varlen_ms"] > 0
