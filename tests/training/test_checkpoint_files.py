"""Checkpoint directory primitives: atomic commit, the latest pointer, keep-last-K, RNG states."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch

from megafim.checkpoint import files, find
from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.state import TrainerState, load_rng, read_trainer_state, save_rng, write_trainer_state


def _save(root, step, keep_last=0, payload=b"x"):
    tmp = files.begin(root, step)
    (tmp / "blob.bin").write_bytes(payload)
    write_trainer_state(tmp, TrainerState(step=step, consumed_samples=step * 8), "a: 1\n")
    return files.commit(root, step, keep_last)


def test_commit_moves_latest_and_keeps_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in files.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    latest = find.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000004"
    assert read_trainer_state(latest).consumed_samples == 32
    assert (latest / "config.yaml").read_text() == "a: 1\n"
    assert find.latest_checkpoint(latest) == latest  # a checkpoint directory itself is accepted
    assert not list(tmp_path.glob(".tmp-*"))


def test_no_checkpoint_and_broken_pointer(tmp_path):
    assert find.latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("step_00000009\n")
    try:
        find.latest_checkpoint(tmp_path)
    except CheckpointError as exc:
        assert "step_00000009" in str(exc)
    else:
        raise AssertionError("a pointer to a missing checkpoint must raise")


def test_kill_during_save_leaves_previous_latest(tmp_path):
    """SIGKILL a process in the middle of writing a large checkpoint: step 1 stays the latest."""
    script = textwrap.dedent(f"""
        import sys, time
        from megafim.checkpoint import files
        from megafim.checkpoint.state import TrainerState, write_trainer_state
        root = {str(tmp_path)!r}
        tmp = files.begin(root, 1); (tmp / "blob.bin").write_bytes(b"one")
        write_trainer_state(tmp, TrainerState(step=1), ""); files.commit(root, 1, 0)
        tmp = files.begin(root, 2)
        with open(tmp / "blob.bin", "wb") as fh:
            print("writing", flush=True)
            for _ in range(10**6):
                fh.write(b"0" * 4096); fh.flush(); time.sleep(0.001)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = find.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001" and (latest / "blob.bin").read_bytes() == b"one"
    assert (tmp_path / ".tmp-step_00000002").exists()  # the torn save is there but invisible
    _save(tmp_path, 2)  # the next save clears it
    assert find.latest_checkpoint(tmp_path).name == "step_00000002"
    assert not list(tmp_path.glob(".tmp-*"))


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_rng(tmp_path, rank=0)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert load_rng(tmp_path, rank=0)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    assert not load_rng(tmp_path, rank=5)


def test_metrics_of_steps_after_the_resume_point_are_dropped(tmp_path):
    import json

    from megafim.training.metrics import MetricsLogger, StepMetrics

    log = MetricsLogger(str(tmp_path), 10, enabled=True, tensorboard=False, progress_bar="off", log_interval=100)
    for step in range(1, 6):  # the run got to step 5, its last checkpoint was step 3
        log.log(StepMetrics(step=step, loss=float(step)))
    log.close()
    log = MetricsLogger(str(tmp_path), 10, enabled=True, tensorboard=False, progress_bar="off", start_step=3,
                        log_interval=100)
    log.log(StepMetrics(step=4, loss=40.0, grad_norm=float("nan")))
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert rows[-1]["grad_norm"] == "nan"
