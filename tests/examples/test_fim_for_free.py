"""examples/fim_for_free: settings are checked before anything trains, the tables say what the numbers
are, and the script runs end to end at a very small size (JSON, Markdown and PNG written; reuse)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "fim_for_free" / "run.py"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
KINDS = ("ar", "fim_psm", "fim_spm", "middle_psm", "middle_spm", "middle_ar")


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def load_report():
    spec = importlib.util.spec_from_file_location("fim_for_free_report", SCRIPT.parent / "fim_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--fim-rates", "0", "1.5"], "--fim-rates: 1.5 is not a probability"),
    (["--fim-rates", "0.5", "0.5"], "repeats a rate"),
    (["--eval-interval", "0"], "--eval-interval: must be at least 1"),
    (["--data-path", "x"], "--data-path, --heldout-path and --tokenizer-model go together"),
    (["--config", "no/such.yaml"], "--config no/such.yaml: no such file"),
    (["--set", "model.no_such_field=1"], "unknown field model.no_such_field"),
])
def test_bad_settings_fail_before_training(tmp_path, args, message):
    result = run_script("--out", str(tmp_path / "out"), *args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was built or trained


def fake_eval(step: int, ar: float) -> dict:
    losses = {kind: {"loss": ar + 0.5 + i * 0.01, "tokens": 100 + i} for i, kind in enumerate(KINDS)}
    losses["ar"]["loss"] = ar
    return {"step": step, "tokens_seen": step * 10, "losses": {"samples": 4, "seq_length": 32, **losses}}


def test_tables_compare_each_rate_with_rate_zero():
    report = load_report()
    runs = [{"fim_rate": 0.0, "evals": [fake_eval(10, 5.0), fake_eval(20, 4.0)]},
            {"fim_rate": 0.5, "evals": [fake_eval(10, 5.1), fake_eval(20, 4.25)]}]
    final = report.final_table(runs).splitlines()
    assert final[0].startswith("| FIM rate | step | AR | FIM PSM")
    assert final[2].startswith("| 0 | 20 | 4.0000 |") and final[2].endswith("| +0.0000 |")
    assert final[3].startswith("| 0.5 | 20 | 4.2500 |") and final[3].endswith("| +0.2500 |")
    curve = report.curve_table(runs, "ar").splitlines()
    assert curve[0] == "| step | rate 0 | rate 0.5 |"
    assert curve[2:] == ["| 10 | 5.0000 | 5.1000 |", "| 20 | 4.0000 | 4.2500 |"]
    assert "ar 100" in report.token_counts(runs) and "middle_ar 105" in report.token_counts(runs)


def write_jsonl(path: Path, files: list[Path]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for file in files:
            out.write(json.dumps({"text": file.read_text(encoding="utf-8")}) + "\n")



FAKE_TRAINER = """
import pathlib, sys, time
save = pathlib.Path(sys.argv[1])
for step in (2, 4):
    ckpt = save / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (save / "latest").write_text(ckpt.name)
    time.sleep(3)  # the watcher (every 2 s) sees step 2 while it is still the latest
"""


def test_evaluated_checkpoints_are_deleted_once_no_longer_latest(tmp_path):
    """A checkpoint evaluated while it was the latest goes as soon as a newer one exists."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("fim_for_free_run", SCRIPT)
        run = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = run  # its dataclasses look their module up
        spec.loader.exec_module(run)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    save = tmp_path / "ckpts"
    evals = run.train_and_watch([sys.executable, "-c", FAKE_TRAINER, str(save)], save, tmp_path,
                                lambda ckpt, step: {"step": step}, keep=False, env=None)
    assert [e["step"] for e in evals] == [2, 4]
    assert sorted(p.name for p in save.glob("step_*")) == ["step_00000004"]

@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    """Two rates, 4 steps each, evaluated at steps 2 and 4 on 4 held-out contexts (~1 minute)."""
    train_files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:12]
    write_jsonl(tmp_path / "train.jsonl", train_files)
    write_jsonl(tmp_path / "heldout.jsonl", sorted((STDLIB / "http").glob("*.py")))
    out = tmp_path / "out"
    args = ["--out", str(out), "--train-jsonl", str(tmp_path / "train.jsonl"), "--heldout-jsonl",
            str(tmp_path / "heldout.jsonl"), "--vocab-size", "512", "--fim-rates", "0", "0.5",
            "--train-iters", "4", "--eval-interval", "2", "--eval-samples", "4", "--eval-batch-size", "4"]
    result = run_script(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("python ") and "--fim-rates 0 0.5" in results["command"]
    assert {"platform", "torch", "cpu_count"} <= set(results["machine"])
    assert [r["fim_rate"] for r in results["runs"]] == [0.0, 0.5]
    for run in results["runs"]:
        assert run["train_iters"] == 4 and run["tokens_per_step"] == 16 * 128
        assert [e["step"] for e in run["evals"]] == [2, 4]
        for evaluation in run["evals"]:
            losses = evaluation["losses"]
            assert losses["samples"] == 4 and losses["seq_length"] == 128
            for kind in KINDS:
                assert math.isfinite(losses[kind]["loss"]) and 0 < losses[kind]["loss"] < 10
                assert losses[kind]["tokens"] > 0
        # Evaluated checkpoints are deleted, the last one stays (it is what `latest` names).
        save = out / "runs" / "fim_0" if run["fim_rate"] == 0 else out / "runs" / "fim_0.5"
        assert sorted(p.name for p in (save / "checkpoints").glob("step_*")) == ["step_00000004"]
    # Same held-out contexts and cut points for every run: the token counts match kind by kind.
    counts = [{k: e["losses"][k]["tokens"] for k in KINDS} for r in results["runs"] for e in r["evals"]]
    assert all(c == counts[0] for c in counts)
    # Training changed the model: the losses at steps 2 and 4 differ.
    first, last = results["runs"][0]["evals"]
    assert first["losses"]["ar"]["loss"] != last["losses"]["ar"]["loss"]

    png = (out / "fim_for_free.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 300_000
    markdown = (out / "results.md").read_text()
    assert "| FIM rate | step | AR | FIM PSM | FIM SPM | middle PSM | middle SPM | middle L2R |" in markdown

    again = run_script(*args)  # the same settings: both runs are reused, nothing trains
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("reusing the finished run") == 2
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
