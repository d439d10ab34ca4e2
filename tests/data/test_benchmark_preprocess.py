"""benchmarks/preprocess.py finds Megatron-LM from --megatron-lm or $MEGATRON_LM, never from a path of
one machine, and measures megafim alone (saying so) without it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # for its `from report import ...`
    spec = importlib.util.spec_from_file_location("bench_preprocess", REPO / "benchmarks" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checkout_comes_from_the_flag_or_the_environment(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MEGATRON_LM", raising=False)
    monkeypatch.setattr(sys, "argv", ["preprocess.py"])
    assert bench.parse_args().megatron_lm is None
    assert bench.megatron_checkout(None) is None
    assert "Megatron-LM: skipped (no checkout: pass --megatron-lm DIR or set MEGATRON_LM" in capsys.readouterr().out

    checkout = tmp_path / "Megatron-LM"
    (checkout / "tools").mkdir(parents=True)
    (checkout / "tools" / "preprocess_data.py").write_text("")
    (checkout / "megatron").mkdir()
    monkeypatch.setenv("MEGATRON_LM", str(checkout))
    assert bench.megatron_checkout(bench.parse_args().megatron_lm) == checkout.resolve()
    monkeypatch.setattr(sys, "argv", ["preprocess.py", "--megatron-lm", str(tmp_path / "other")])
    assert bench.parse_args().megatron_lm == str(tmp_path / "other")  # the flag wins


def test_a_wrong_checkout_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "preprocess.py"), "--megatron-lm",
                          str(tmp_path), "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"preprocess benchmark: error: --megatron-lm {tmp_path}: not a Megatron-LM checkout (needs "
        "tools/preprocess_data.py and megatron/)"]
    assert not (tmp_path / "w").exists()  # refused before any work


def test_no_machine_specific_path_remains():
    text = (REPO / "benchmarks" / "preprocess.py").read_text()
    assert "/work/" not in text and "/tmp/megatron-lm" not in text
