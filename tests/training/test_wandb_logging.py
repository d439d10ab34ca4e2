"""Weights & Biases logging: an offline 1-rank run logs the numbers of metrics.jsonl step by step; a resumed
run continues the same W&B run; a run that raises is recorded as failed; asking for W&B without wandb
installed, or naming a run without a project, is one line and exit 2."""

import math
import subprocess
import sys

import pytest

from megafim.training.cli import config_from_args
from megafim.training.config import ConfigError, TrainConfig, validate
from megafim.training.wandb_logger import RUN_ID_FILE, WandbRun
from tests.training.launcher import REPO, base_args, check, launch, metrics, trainer_env
from tests.training.wandb_records import exit_code, history, run_id


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline and silent, its own files under tmp_path (nothing lands in the home directory)."""
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_env"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def expected_scalars(record: dict) -> dict[str, float]:
    """What W&B should hold for one metrics.jsonl line, spelled out: every finite number but the step
    and the ``skipped`` flag, training ones under ``train/``, validation ones under ``valid/``."""
    out = {}
    for key, value in record.items():
        if key in ("step", "skipped") or value is None or isinstance(value, str):
            continue
        assert math.isfinite(value)
        out["valid/" + key.removeprefix("valid_") if key.startswith("valid_") else "train/" + key] = value
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_offline_run_logs_the_scalars_of_metrics_jsonl(tiny_data, tmp_path, offline_wandb):
    save = tmp_path / "run"
    args = base_args(tiny_data) + ["--train-iters", "3", "--save", str(save), "--eval-interval", "2",
                                   "--eval-iters", "1", "--wandb-project", "megafim-test",
                                   "--wandb-exp-name", "tiny"]
    proc = launch(1, args, tmp_path)
    check(proc)
    assert "step      3 | loss" in proc.stdout  # W&B's console capture leaves the trainer's lines alone
    runs = list((save / "wandb").glob("offline-run-*"))  # the default: under <checkpoint.save>/wandb
    assert len(runs) == 1, runs
    logged = history(runs[0])
    lines = metrics(save)
    assert sorted(logged) == [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        want = expected_scalars(line)
        assert {"train/loss", "train/loss_head_1", "train/loss_head_2", "train/lr", "train/grad_norm"} \
            <= set(want)
        assert ("valid/loss" in want) == (line["step"] >= 2)
        assert logged[line["step"]] == pytest.approx(want, rel=1e-12), line["step"]


def test_wandb_project_without_wandb_is_one_line_and_exit_2(tiny_data, tmp_path):
    """With wandb not importable the trainer stops in ``validate``, before the data path (missing here)
    is even looked at."""
    no_wandb = "import sys; sys.modules['wandb'] = None; from megafim.train import main; sys.exit(main())"
    args = base_args(tiny_data) + ["--data-path", str(tmp_path / "missing_text_document"),
                                   "--wandb-project", "p"]
    proc = subprocess.run([sys.executable, "-c", no_wandb, *args], cwd=REPO, env=trainer_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    check(proc, code=2)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "logging.wandb_project (--wandb-project)" in proc.stderr and "pip install wandb" in proc.stderr


@pytest.mark.parametrize("field", ["wandb_exp_name", "wandb_save_dir"])
def test_wandb_settings_without_a_project_are_refused(field):
    cfg, _ = config_from_args(["--set", f"logging.{field}=x"])
    with pytest.raises(ConfigError, match=f"logging.{field} is set but logging.wandb_project"):
        validate(cfg, 1)


@pytest.mark.distributed
@pytest.mark.slow
def test_wandb_that_cannot_start_is_one_line_and_exit_2(tiny_data, tmp_path, monkeypatch):
    """Online without an API key: ``wandb.init`` refuses, the trainer says so in one line naming the
    setting, before the model is built and before metrics.jsonl is opened."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("HOME", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "no_login"))  # no ~/.netrc, no saved login
    monkeypatch.setenv("WANDB_MODE", "online")
    save = tmp_path / "run"
    args = base_args(tiny_data) + ["--train-iters", "2", "--save", str(save), "--wandb-project", "p"]
    proc = launch(1, args, tmp_path, timeout=180)
    check(proc, code=2)
    assert "megafim.train: error: logging.wandb_project 'p': W&B could not start the run" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (save / "metrics.jsonl").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_only_the_logging_rank_opens_a_wandb_run(tiny_data, tmp_path, offline_wandb):
    save = tmp_path / "run"
    args = base_args(tiny_data) + ["--train-iters", "1", "--save", str(save), "--wandb-project", "p"]
    check(launch(2, args, tmp_path))
    runs = [*(save / "wandb").glob("offline-run-*"), *(tmp_path / "wandb_env").rglob("offline-run-*")]
    assert len(runs) == 1, runs
    assert sorted(history(runs[0])) == [1]


def _offline_runs(save):
    """The offline run folders under ``<save>/wandb``, oldest first (their names start with the time)."""
    return sorted((save / "wandb").glob("offline-run-*"))


@pytest.mark.distributed
@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run(tiny_data, tmp_path, offline_wandb):
    """2 steps, then a resume (``--load`` of the same save directory) to 4: both starts log to the run
    id recorded in <save>/wandb_run_id, the second from step 3 on, and both finish with exit code 0."""
    save = tmp_path / "run"
    args = base_args(tiny_data) + ["--save", str(save), "--wandb-project", "p"]
    check(launch(1, args + ["--train-iters", "2"], tmp_path))
    check(launch(1, args + ["--train-iters", "4", "--load", str(save)], tmp_path))
    first, second = _offline_runs(save)  # offline, each start writes its own folder; `wandb sync` joins them
    recorded = (save / RUN_ID_FILE).read_text().strip()
    assert run_id(first) == run_id(second) == recorded
    assert sorted(history(first)) == [1, 2] and sorted(history(second)) == [3, 4]
    assert [line["step"] for line in metrics(save)] == [1, 2, 3, 4]
    assert exit_code(first) == exit_code(second) == 0


@pytest.mark.distributed
@pytest.mark.slow
def test_a_run_that_raises_finishes_its_wandb_run_as_failed(tiny_data, tmp_path, offline_wandb):
    """A file where the step-2 checkpoint directory goes makes the save at the end of training raise
    (the trainer does not see it at start: only directories are checkpoints). The steps before are
    logged, and W&B records exit code 1, not the 0 of a finished run."""
    save = tmp_path / "run"
    save.mkdir()
    (save / "step_00000002").write_text("in the way\n")
    args = base_args(tiny_data) + ["--train-iters", "2", "--save", str(save), "--wandb-project", "p"]
    proc = launch(1, args, tmp_path)
    check(proc, code=1)
    assert "NotADirectoryError" in proc.stderr
    (run,) = _offline_runs(save)
    assert sorted(history(run)) == [1, 2]
    assert exit_code(run) == 1


def test_only_a_resume_reuses_the_recorded_run_id(tmp_path, offline_wandb):
    """In-process: a start from step 0 opens a new run and records its id; a resume reuses the recorded
    id; a resume into a save directory without one (a new save directory) opens a new run."""
    cfg = TrainConfig()
    cfg.logging.wandb_project = "p"
    cfg.checkpoint.save = str(tmp_path / "a")
    ids = []
    for resuming in (False, True, False):
        run = WandbRun.open(cfg, resuming=resuming)
        run.close()
        ids.append(run.run.id)
        assert (tmp_path / "a" / RUN_ID_FILE).read_text() == run.run.id + "\n"
    assert ids[1] == ids[0] and ids[2] != ids[0]
    cfg.checkpoint.save = str(tmp_path / "b")
    run = WandbRun.open(cfg, resuming=True)
    run.close()
    assert run.run.id not in ids and (tmp_path / "b" / RUN_ID_FILE).read_text().strip() == run.run.id
