"""Context parallelism: the chunk layout, and with real torchrun (gloo, CPU, fp32) cp = 2 and
cp = 2 x tp = 2 (with and without sequence parallelism) give the losses and every gradient of the
unsplit model, with document masks, FIM and n_future = 4."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafim.parallel.context_parallel import check_context_parallel_sizes, gathered_positions, local_positions
from megafim.parallel.dims import group_layout
from tests.data.test_fim_fixtures import small_model, train_tool  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "parallel" / "cp_worker.py"


def test_each_rank_holds_an_early_and_a_late_chunk():
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert gathered_positions(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    for cp in (1, 2, 4):  # the ranks' positions cover the sequence once, and causal work is balanced
        parts = [local_positions(48, cp, r) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(48))
        assert len({int((p + 1).sum()) for p in parts}) == 1  # keys each rank's queries see


def test_sizes_that_do_not_split_name_the_flag():
    with pytest.raises(ValueError, match="--context-parallel-size 2: the sequence length 30 is not divisible by 2 x 2"):
        check_context_parallel_sizes(30, 2)


def test_context_ranks_sit_between_tensor_and_data_ranks():
    g = group_layout(tp=2, dp=2, pp=1, cp=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["model"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def _torchrun(nproc, tokenizer, cases, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(tokenizer), *cases]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for case in cases:
        assert f"OK {case} " in proc.stdout, output[-6000:]


@pytest.mark.distributed
def test_cp2_matches_the_unsplit_model(small_model, tmp_path):  # noqa: F811
    _torchrun(2, small_model, ["cp=2,tp=1,sp=0"], tmp_path)


@pytest.mark.distributed
@pytest.mark.slow
def test_cp2_tp2_matches_the_unsplit_model(small_model, tmp_path):  # noqa: F811
    _torchrun(4, small_model, ["cp=2,tp=2,sp=0", "cp=2,tp=2,sp=1"], tmp_path)
