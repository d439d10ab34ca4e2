"""A skipped (non-finite) step skips the whole update under every ZeRO stage and nothing after it:
ZeRO 1/2/3 call the optimizer once per parameter group, and ZeRO 1/2 not at all when they find the
gradients non-finite themselves, so a skip consumed by the first call lost the next step's update of
the matrices and left the groups' Adam step counts apart."""

import json
import subprocess
import sys

import pytest

from tests.training.launcher import REPO, trainer_env

pytestmark = [pytest.mark.distributed]


def test_a_skipped_step_skips_every_group_once_under_every_zero_stage(tmp_path):
    out = tmp_path / "skip.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(REPO / "tests/training/optim_skip_worker.py"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(out.read_text())
    assert len(results) == 8
    for stage, result in results.items():
        assert result["steps"] and set(result["steps"]) == {2.0}, (stage, result)
        assert result["max_abs_diff"] <= 1e-6, (stage, result)
