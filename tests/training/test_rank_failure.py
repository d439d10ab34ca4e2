"""Surviving a failed rank: torchrun restarts every rank when one dies, and the restarted ranks
resume from the newest complete checkpoint by themselves (``--load`` defaults to ``--save``).

Before the fix, the restarted ranks met in torchrun's store, which outlives a restart, and read the
previous attempt's keys (the dead ranks' gloo addresses, spent barrier counters): they failed to
connect or waited up to the 30-minute process-group timeout (megafim/training/distributed.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.training.launcher import REPO, base_args, check, launch, metrics, trainer_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KEYS = ("step", "loss", "loss_head_1", "loss_head_2", "grad_norm", "lr", "consumed_samples")


def _kill_one_rank_after(save, step, agent, timeout=240):
    """SIGKILL one rank (a child of the torchrun agent) once ``step`` steps are logged."""
    deadline = time.time() + timeout
    path = save / "metrics.jsonl"
    while time.time() < deadline and agent.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= step:
            ranks = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                   text=True).stdout.split()
            assert len(ranks) == 2, ranks
            os.kill(int(ranks[-1]), signal.SIGKILL)
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit {agent.poll()})")


def test_a_killed_rank_restarts_and_the_run_ends_as_if_uninterrupted(tiny_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = base_args(tiny_data) + ["--train-iters", "12", "--save-interval", "4", "--zero-stage", "1",
                                   "--distributed-timeout-minutes", "2"]
    check(launch(2, args + ["--save", str(straight)], tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "-m", "megafim.train", *args, "--save", str(killed)]
    agent = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _kill_one_rank_after(killed, 5, agent)  # after the save at step 4, before the end
        out, _ = agent.communicate(timeout=300)
    finally:
        agent.kill()
    assert agent.returncode == 0, out[-5000:]
    assert "resuming from it" in out and "resume: from" in out  # the restart resumed, not started over
    rows = [[{k: r[k] for k in KEYS} for r in metrics(run)] for run in (killed, straight)]
    assert rows[0] == rows[1] and len(rows[0]) == 12
    assert (killed / "latest").read_text().strip() == "step_00000012"
