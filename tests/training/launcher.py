"""Run ``megafim.train`` as a user would (plain python, or torchrun for several ranks) and read its output."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def base_args(tiny_data, **overrides) -> list[str]:
    """A tiny, fast run: 3 trunk+head-1 layers of width 64, 2 heads, 32 tokens, 4 samples a step."""
    data, tok = tiny_data
    args = ["--config", str(REPO / "examples/configs/tiny.yaml"), "--data-path", data, "--tokenizer-model", tok,
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--n-future", "2",
            "--lr", "1e-2", "--set", "model.n_layers=3", "--set", "schedule.warmup_iters=0",
            "--set", "logging.tensorboard=false", "--set", "logging.log_interval=1",
            "--set", "checkpoint.keep_last=0"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def trainer_env(tmp_path) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the trainer runs torch's CPU path, not Triton's interpreter
    return env


def launch(nproc: int, args: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the trainer with ``nproc`` ranks on this machine; returns the finished process."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megafim.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megafim.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=trainer_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def metrics(save_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]
