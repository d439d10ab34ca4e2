"""The README's main command, end to end at a small size: every stage runs and leaves its output."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("max_files", [30, 60, 61])
def test_small_corpora_keep_a_held_out_file(tmp_path, max_files):
    """With 60 files the path hash sends none to the held-out split; stage 6 then had no data."""
    qs = load_quickstart()
    train, held, n_train, n_held = qs.write_corpus(tmp_path, max_files)
    assert n_held >= 1 and n_train + n_held == max_files
    assert len(held.read_text().splitlines()) == n_held and len(train.read_text().splitlines()) == n_train
    assert not set(held.read_text().splitlines()) & set(train.read_text().splitlines())


def test_too_few_files_are_refused_up_front(tmp_path):
    out = subprocess.run([sys.executable, "examples/quickstart.py", "--out", str(tmp_path / "qs"), "--max-files",
                          "10"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "quickstart: error: --max-files 10: at least 30 files are needed (a held-out file for stage 6 and a "
        "validation share of the training files)"]
    assert not (tmp_path / "qs").exists()


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path):
    """At --max-files 60, where the path hash alone leaves the held-out split empty."""
    out = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--out", str(out), "--max-files", "60", "--vocab-size", "2000",
         "--seq-length", "64", "--train-iters", "12"],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in range(1, 9):
        assert f"=== {stage}/8" in result.stdout
    assert (out / "tokenizer" / "stdlib.model").is_file()
    for name in ("train", "heldout"):
        assert (out / "data" / f"{name}_text_document.idx").is_file()
    metrics = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == 12
    assert [m["step"] for m in metrics if "valid_loss" in m] == [4, 8, 12]
    assert "validation loss (2% of the training files" in result.stdout
    assert (out / "checkpoints" / "latest").is_file()
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()
    assert "middle_ar" in result.stdout  # the evaluation table
    assert "next:" in result.stdout
