"""Tensor parallelism with real torchrun (gloo, CPU, fp32): loss and every gradient equal tp = 1.

Two launcher runs check every case: tp = 2 and tp = 4, n_future = 1 and 2, with and without
sequence parallelism, plus tp = 2 x dp = 2, one case with activation checkpointing and two with
q/k/v biases and tied embeddings; each also checks the collectives and the DeepSpeed mpu's
groups, and the tp = 2 run trains one step under DeepSpeed ZeRO-1 and ZeRO-2 with that mpu; both check
that the trainer's stage build (meta device, then one weight at a time) gives each rank its slices of
the whole seeded model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "parallel" / "tp_worker.py"


def _cases(tp, dp=1):
    return [f"tp={tp},dp={dp},n_future={n},sp={sp}" for n in (1, 2) for sp in (0, 1)]


def _torchrun(nproc, cases, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *cases]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for case in cases:
        assert f"OK {case} " in proc.stdout, output[-6000:]


def test_tp2_matches_tp1_and_deepspeed_sees_the_tp1_grad_norm(tmp_path):
    _torchrun(2, [*_cases(2), "tp=2,dp=1,n_future=2,sp=1,ckpt=1", "tp=2,dp=1,n_future=2,sp=0,bias=1,tie=1",
                  "tp=2,dp=1,n_future=1,sp=1,bias=1,tie=1", "zero=1", "zero=2", "build=2"], tmp_path)


def test_tp4_and_tp2_dp2_match_tp1(tmp_path):
    _torchrun(4, [*_cases(4), "tp=2,dp=2,n_future=2,sp=1", "build=4"], tmp_path)

