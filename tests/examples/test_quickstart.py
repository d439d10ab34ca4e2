"""The README's main command, end to end at a small size: every stage runs and leaves its output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--out", str(out), "--max-files", "400", "--vocab-size", "2000",
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
