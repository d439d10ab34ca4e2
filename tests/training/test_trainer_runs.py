"""The trainer end to end on the CPU: errors before any process group, a run whose loss falls,
NaN steps skipped then the run stopped with a checkpoint, and saves on SIGUSR1 / SIGTERM."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.training.launcher import REPO, base_args, check, launch, metrics, trainer_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_config_error_exits_2_with_one_line(tiny_data, tmp_path):
    proc = launch(1, base_args(tiny_data) + ["--global-batch-size", "6", "--micro-batch-size", "4"], tmp_path,
                  timeout=120)
    check(proc, code=2)
    assert "batch.global_batch_size 6 is not divisible" in proc.stderr and "Traceback" not in proc.stderr


def test_config_error_under_torchrun_is_printed_once(tiny_data, tmp_path):
    proc = launch(2, base_args(tiny_data) + ["--set", "model.size=tinyy"], tmp_path, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("megafim.train: error: model.size: unknown size 'tinyy'") == 1, proc.stderr
    # torchrun's own ChildFailedError summary follows; ours is the one line above it.


def test_wrong_data_path_fails_before_the_model_is_built(tiny_data, tmp_path):
    save = tmp_path / "run"
    proc = launch(1, base_args(tiny_data) + ["--data-path", str(tmp_path / "missing_text_document"),
                                             "--save", str(save)], tmp_path, timeout=120)
    check(proc, code=2)
    assert proc.stderr.count("\n") == 1 and "data.data_path" in proc.stderr, proc.stderr
    assert not save.exists()  # nothing written: no empty metrics.jsonl


@pytest.mark.parametrize("extra, world_size, message", [
    (["--tensor-model-parallel-size", "3"], 1, "world size 1 is not divisible by tensor (3)"),
    (["--tensor-model-parallel-size", "3"], 3, "model.n_heads = 8 is not divisible by the tensor-parallel size 3"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "3"], 2,
     "parallel.zero_stage = 3 with parallel.pipeline > 1"),
    (["--pipeline-model-parallel-size", "4"], 4, "parallel.pipeline = 4 stages need at least 3 trunk layers"),
    (["--zero-stage", "3", "--set", "model.compile=true"], 1, "model.compile = true with parallel.zero_stage = 3"),
    (["--tokenizer-model", "/nonexistent.model"], 1, "data.tokenizer_model"),
    (["--set", "model.size=tinyy"], 1, "model.size: unknown size 'tinyy'"),
    (["--seq-length", "512", "--set", "model.max_seq_len=128"], 1, "data.seq_length 512 exceeds model.max_seq_len 128"),
    (["--data-path", "/nonexistent/data_text_document"], 1, "data.data_path: "),
])
def test_checks_before_any_process_group(tiny_data, extra, world_size, message):
    from megafim.training.cli import config_from_args
    from megafim.training.config import ConfigError
    from megafim.training.loop import check_before_groups

    cfg, _ = config_from_args(base_args(tiny_data) + extra)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_before_groups(cfg, world_size)


def test_loss_falls_and_exact_resume(tiny_data, tmp_path):
    """One rank, ZeRO-0: the loss falls over 8 steps; the outputs are all there; resuming from step 4
    reproduces steps 5-8 bit for bit."""
    save, resumed = tmp_path / "run", tmp_path / "resumed"
    args = base_args(tiny_data) + ["--train-iters", "8", "--zero-stage", "0"]
    check(launch(1, args + ["--save", str(save), "--save-interval", "4", "--set", "logging.tensorboard=true"],
                 tmp_path))
    check(launch(1, args + ["--save", str(resumed), "--load", str(save)], tmp_path))  # latest is step 8...
    assert metrics(resumed) == []  # ...so there is nothing left to train
    check(launch(1, args + ["--save", str(resumed), "--load", str(save / "step_00000004")], tmp_path))
    keys = ("step", "loss", "loss_head_1", "loss_head_2", "grad_norm", "lr")
    assert [{k: r[k] for k in keys} for r in metrics(resumed)] == [{k: r[k] for k in keys}
                                                                   for r in metrics(save)[4:]]
    rows = metrics(save)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # from ~2 x ln(512) = 12.5, visibly down
    for r in rows:
        assert set(r) >= {"step", "loss", "loss_head_1", "loss_head_2", "lr", "grad_norm", "tokens_per_s",
                          "mfu", "memory_gib"}
        assert r["loss"] == pytest.approx(r["loss_head_1"] + r["loss_head_2"])
        assert isinstance(r["grad_norm"], float) and r["grad_norm"] > 0  # ZeRO-0 fp32: ours, not nan
    assert (save / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in save.glob("step_*")) == ["step_00000004", "step_00000008"]
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    assert (save / "step_00000008" / "tokenizer.model").read_bytes() == Path(tiny_data[1]).read_bytes()
    saved = (save / "step_00000008" / "config.yaml").read_text()
    assert "train_iters: 8" in saved and "n_future: 2" in saved




def test_zero0_reports_the_gradient_norm_zero1_reports(tiny_data, tmp_path):
    """DeepSpeed keeps no gradient norm under ZeRO-0 in fp32; the trainer's own equals ZeRO-1's."""
    norms = {}
    for stage in ("0", "1"):
        save = tmp_path / f"zero{stage}"
        check(launch(1, base_args(tiny_data) + ["--train-iters", "2", "--zero-stage", stage, "--save", str(save)],
                     tmp_path))
        norms[stage] = [r["grad_norm"] for r in metrics(save)]
    assert norms["0"] == pytest.approx(norms["1"], rel=1e-5)

def test_validation_every_n_steps_leaves_training_alone_and_agrees_under_pipeline(tiny_data, tmp_path):
    """--eval-interval 2 over 3 steps evaluates after steps 2 and 3 (the end), into metrics.jsonl and the
    console; the training losses are those of a run without validation, and a pp = 2 run (the forward-
    only pass through both stages) gets the same validation losses."""
    args = base_args(tiny_data) + ["--train-iters", "3", "--zero-stage", "1"]
    check(launch(1, args + ["--save", str(tmp_path / "plain")], tmp_path))
    runs = {}
    for pp in (1, 2):
        save = tmp_path / f"pp{pp}"
        proc = launch(pp, args + ["--save", str(save), "--eval-interval", "2", "--eval-iters", "2",
                                  "--pipeline-model-parallel-size", str(pp)], tmp_path)
        check(proc)
        assert "validation at step 2 | loss" in proc.stdout and "validation at step 3 | loss" in proc.stdout
        runs[pp] = metrics(save)
    assert [r["loss"] for r in runs[1]] == [r["loss"] for r in metrics(tmp_path / "plain")]
    assert [r["step"] for r in runs[1] if "valid_loss" in r] == [2, 3]
    for one, two in zip(runs[1], runs[2], strict=True):
        for key in ("valid_loss", "valid_loss_head_1", "valid_loss_head_2"):
            assert (key in one) == (key in two) == (one["step"] != 1)
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-5)


def test_profiled_steps_write_trace_and_op_tables_and_train_the_same(tiny_data, tmp_path):
    """--profile-step-start/-end on both ranks of tp=2: each writes a Chrome trace with the profiled
    steps as spans and an op table; the losses equal those of the same run without profiling."""
    args = base_args(tiny_data) + ["--train-iters", "3", "--tensor-model-parallel-size", "2"]
    check(launch(2, args + ["--save", str(tmp_path / "plain")], tmp_path))
    save = tmp_path / "profiled"
    proc = launch(2, args + ["--save", str(save), "--profile-step-start", "2", "--profile-step-end", "3",
                             "--profile-ranks", "0", "1"], tmp_path)
    check(proc)
    assert "profile: steps 2-3 of rank 0 written to" in proc.stdout
    for rank in (0, 1):
        out = save / "profile" / f"rank{rank}"
        spans = {e.get("name") for e in json.loads((out / "trace.json").read_text())["traceEvents"]}
        assert {"step 2", "step 3"} <= spans and "step 1" not in spans
        ops = json.loads((out / "ops.json").read_text())
        assert ops["steps"] == [2, 3] and any("mm" in op["name"] or "linear" in op["name"] for op in ops["ops"])
        assert "Self CPU" in (out / "ops.txt").read_text()
    assert [r["loss"] for r in metrics(save)] == [r["loss"] for r in metrics(tmp_path / "plain")]


def test_compiled_blocks_train_like_eager(tiny_data, tmp_path):
    """model.compile = true (torch.compile per block) gives the eager run's losses, to rounding."""
    args = base_args(tiny_data) + ["--train-iters", "3", "--zero-stage", "1"]
    runs = {}
    for compiled in (False, True):
        save = tmp_path / f"compile_{compiled}"
        proc = launch(1, args + ["--save", str(save), "--set", f"model.compile={str(compiled).lower()}"],
                      tmp_path)
        check(proc)
        runs[compiled] = metrics(save)
    assert "blocks compiled with torch.compile" in proc.stdout + proc.stderr
    for eager, compiled in zip(runs[False], runs[True], strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
        assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-3)

def test_nonfinite_steps_are_skipped_then_the_run_stops(tiny_data, tmp_path):
    """An infinite learning rate makes the weights inf/NaN after one update, so every later loss is NaN:
    those steps must not change the weights, and 3 in a row stop the run (exit 3) with a checkpoint."""
    save = tmp_path / "run"
    args = base_args(tiny_data, **{"logging.max_nonfinite_in_a_row": 3}) + [
        "--train-iters", "20", "--lr", "inf", "--save", str(save), "--save-interval", "1",
        "--set", "optimizer.clip_grad=0"]
    check(launch(1, args, tmp_path), code=3)
    rows = metrics(save)
    skipped = [r["step"] for r in rows if r["skipped"]]
    assert skipped and skipped == list(range(skipped[0], skipped[0] + 3)) and rows[-1]["step"] == skipped[-1]
    assert all(r["loss"] == "nan" for r in rows if r["skipped"])
    before = load_file(save / f"step_{skipped[0] - 1:08d}" / "model" / "tp00_pp00.safetensors")
    after = load_file(save / f"step_{skipped[-1]:08d}" / "model" / "tp00_pp00.safetensors")
    for name, tensor in before.items():  # bitwise equal, NaN/inf included
        assert tensor.numpy().tobytes() == after[name].numpy().tobytes(), name


def _wait_for_steps(save, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = save / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("the trainer made no progress")


def test_stop_request_records_signals():
    from megafim.training.signals import StopRequest

    stop = StopRequest()
    try:
        assert not stop.requested and not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)  # would kill the process without the handler
        assert stop.requested and stop.signum == signal.SIGUSR1 and stop.agreed()
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.mark.parametrize("nproc, sig", [(2, signal.SIGTERM)])
def test_signal_saves_and_stops(tiny_data, tmp_path, nproc, sig):
    """SIGTERM to torchrun, which passes it to its ranks: a complete checkpoint of the step reached
    (the same on both ranks), then exit. (SIGUSR1 takes the same path: test_stop_request_records_signals.)"""
    save = tmp_path / "run"
    args = base_args(tiny_data) + ["--train-iters", "1000", "--save", str(save)]
    cmd = [sys.executable, "-m", "megafim.train", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "megafim.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(save, 2, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if nproc == 1:
        assert proc.returncode == 0, err[-3000:]
    state = json.loads((save / (save / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 1000
    assert state["consumed_samples"] == 4 * state["step"]
    assert len(metrics(save)) == state["step"]
