"""``--async-save`` on 2 gloo ranks (tp 2, ZeRO-1): the checkpoints equal a synchronous run's byte for
byte and resume exactly; training goes on while a write is pending, a kill during it leaves ``latest``
at the previous complete checkpoint, and the end of training waits for the write.

A slow disk is simulated by ``MEGAFIM_CHECKPOINT_WRITE_DELAY=STEP:SECONDS`` (the writer thread of that
step's save starts its writes that much later), a slow host copy by ``MEGAFIM_CHECKPOINT_COPY_DELAY``."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megafim.checkpoint import manifest
from megafim.checkpoint.writer import COPY_DELAY_ENV
from tests.training.launcher import REPO, base_args, check, launch, metrics, trainer_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KEYS = ("step", "loss", "loss_head_1", "loss_head_2", "grad_norm", "lr", "consumed_samples")
LAYOUT = ["--tensor-model-parallel-size", "2", "--zero-stage", "1"]


def _files(ckpt: Path) -> dict[str, bytes]:
    """Every file of a checkpoint but config.yaml (it names the run's own directory and flags) and the
    manifest (it lists config.yaml's checksum)."""
    return {p.relative_to(ckpt).as_posix(): p.read_bytes() for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name not in ("config.yaml", "manifest.json")}


@pytest.mark.parametrize("layout", [LAYOUT, ["--zero-stage", "1"], LAYOUT + ["--set", "schedule.precision=bf16"]],
                         ids=["tp2", "dp2", "tp2-bf16"])
def test_async_checkpoints_equal_sync_ones_and_resume_exactly(tiny_data, tmp_path, layout, monkeypatch):
    """tp 2: each rank holds its parameters' whole Adam state (optim/ views DeepSpeed's copied flat
    buffer); dp 2: optim/ gathers each parameter's state over the two ranks; bf16: ZeRO-1 writes the
    bf16 parameters from the fp32 masters after the torch optimizer's step. The host copy of step 2's
    save starts 2 s late, while step 3 runs: equal files mean step 3's optimizer step waited for it."""
    sync, background, resumed = tmp_path / "sync", tmp_path / "async", tmp_path / "resumed"
    common = base_args(tiny_data) + layout + ["--train-iters", "4", "--save-interval", "2"]
    check(launch(2, common + ["--save", str(sync)], tmp_path))
    monkeypatch.setenv(COPY_DELAY_ENV, "2:2")
    proc = launch(2, common + ["--save", str(background), "--async-save"], tmp_path)
    monkeypatch.delenv(COPY_DELAY_ENV)
    check(proc)
    assert "handed to the writer" in proc.stdout and "copied and written in the background in" in proc.stdout
    for step in ("step_00000002", "step_00000004"):
        a, b = _files(sync / step), _files(background / step)
        assert sorted(a) == sorted(b)
        assert all(any(name.startswith(f"{d}/") for name in a) for d in ("ds", "model", "optim"))
        assert [name for name in a if a[name] != b[name]] == []
        assert manifest.verify(background / step)
        assert not (background / step / ".writers").exists()
    waits = [float(w) for w in re.findall(r"step waited ([0-9.]+) s for the host copy", proc.stdout)]
    assert len(waits) == 1 and waits[0] > 0.5  # step 3 waited for it (rank 0 logs; step 4 is the last)
    assert (background / "latest").read_text().strip() == "step_00000004"
    assert not list(background.glob(".tmp-*"))
    check(launch(2, common + ["--save", str(resumed), "--load", str(background / "step_00000002")], tmp_path))
    rows = [[{k: r[k] for k in KEYS} for r in metrics(run)] for run in (sync, background, resumed)]
    assert rows[0] == rows[1] and rows[2] == rows[0][2:]


def _wait_for_steps(save: Path, steps: int, proc, timeout=240) -> None:
    deadline = time.time() + timeout
    path = save / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps} (exit {proc.poll()})")


def _kill_all(agent) -> None:
    """SIGKILL the ranks (torchrun starts each in its own session) and then torchrun."""
    ranks = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    for pid in ranks:
        os.kill(int(pid), signal.SIGKILL)
    agent.kill()
    agent.communicate(timeout=60)


def test_a_kill_during_a_pending_write_leaves_the_previous_checkpoint(tiny_data, tmp_path):
    save = tmp_path / "run"
    args = base_args(tiny_data) + LAYOUT + ["--train-iters", "6", "--save-interval", "2", "--async-save",
                                           "--save", str(save)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megafim.train", *args]
    env = dict(trainer_env(tmp_path), MEGAFIM_CHECKPOINT_WRITE_DELAY="4:120")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for_steps(save, 6, proc)  # steps 5 and 6 ran while step 4's write was pending
        assert (save / ".tmp-step_00000004").is_dir()
        assert (save / "latest").read_text().strip() == "step_00000002"
    finally:
        _kill_all(proc)
    assert (save / "latest").read_text().strip() == "step_00000002"
    assert not (save / "step_00000004").exists() and manifest.verify(save / "step_00000002")
    # A restart resumes from it (and the next save clears the incomplete one).
    proc = launch(2, base_args(tiny_data) + LAYOUT + ["--train-iters", "4", "--async-save", "--save", str(save)],
                  tmp_path)
    check(proc)
    assert "resume: from" in proc.stdout and "at step 2" in proc.stdout
    assert (save / "latest").read_text().strip() == "step_00000004" and not list(save.glob(".tmp-*"))
    assert manifest.verify(save / "step_00000004")


def test_the_end_of_training_waits_for_the_pending_write(tiny_data, tmp_path):
    save = tmp_path / "run"
    args = base_args(tiny_data) + LAYOUT + ["--train-iters", "2", "--async-save", "--save", str(save)]
    env = dict(trainer_env(tmp_path), MEGAFIM_CHECKPOINT_WRITE_DELAY="2:3")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "megafim.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    check(proc)
    assert (save / "latest").read_text().strip() == "step_00000002"
    assert manifest.verify(save / "step_00000002")
    state = json.loads((save / "step_00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_a_signal_save_waits_for_the_pending_write(tiny_data, tmp_path):
    """SIGTERM while step 2's write is held back: the signal's save waits for it, then writes its own,
    and the run exits with both complete."""
    save = tmp_path / "run"
    args = base_args(tiny_data) + LAYOUT + ["--train-iters", "1000", "--save-interval", "2", "--async-save",
                                           "--save", str(save)]
    env = dict(trainer_env(tmp_path), MEGAFIM_CHECKPOINT_WRITE_DELAY="2:8")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "megafim.train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(save, 3, proc)
        assert (save / ".tmp-step_00000002").is_dir()  # still pending
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        _kill_all(proc) if proc.poll() is None else None
    assert (save / "latest").is_file(), out[-3000:]
    stopped = json.loads((save / (save / "latest").read_text().strip() / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped < 1000 and len(metrics(save)) == stopped
    assert manifest.verify(save / "step_00000002") and manifest.verify(save / f"step_{stopped:08d}")
    assert not list(save.glob(".tmp-*"))
