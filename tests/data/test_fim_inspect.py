"""tools/inspect_samples.py end to end on a tiny dataset: what it prints is what training reads."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megafim.data.fim import FimConfig, FimTransform, unpermute
from megafim.data.fim_reference import split_pieces
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec
from megafim.data.indexed import IndexedDatasetBuilder
from tests.data.test_fim_fixtures import fim_tokenizer, small_model, train_tool  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
DOCS = ["def add(a, b):\n    return a + b\n", "# 日本語 comment 😀\nx = [1, 2, 3]\n", "class A:\n    pass\n",
        "print('naïve café')\n", "import os\n\nprint(os.getcwd())\n"] * 6


def load_tool():
    spec = importlib.util.spec_from_file_location("inspect_samples", REPO / "tools" / "inspect_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, fim_tokenizer):  # noqa: F811
    prefix = str(tmp_path_factory.mktemp("inspect") / "tiny")
    with IndexedDatasetBuilder(prefix) as b:
        for d in DOCS:
            b.add_document(np.asarray(fim_tokenizer.encode(d) + [fim_tokenizer.eod]))
    return prefix


def run_tool(args: list[str]) -> str:
    out = io.StringIO()
    assert load_tool().main(args, stream=out) == 0
    return out.getvalue()


def test_json_lines_are_the_training_samples(dataset, small_model, fim_tokenizer):  # noqa: F811
    tok = fim_tokenizer
    lines = run_tool(["--data-path", dataset, "--tokenizer-model", small_model, "--seq-length", "64",
                      "--fim-rate", "0.9", "--fim-spm-rate", "0.5", "--seed", "7", "--start", "2",
                      "--num-samples", "5", "--json"]).splitlines()
    assert len(lines) == 5
    ds = GPTDataset(GPTDatasetSpec(path_prefix=dataset, seq_length=64, seed=7),
                    fim=FimTransform(FimConfig(rate=0.9, spm_rate=0.5), tok))
    modes = []
    for k, line in enumerate(lines):
        obj = json.loads(line)
        assert obj["index"] == 2 + k and obj["epoch"] == ds.epoch_of(2 + k)
        assert len(obj["tokens"]) == len(obj["loss_mask"]) == len(obj["middle_mask"]) == 65
        train = ds[obj["index"]]  # the very sample the trainer gets
        assert train["tokens"].tolist() == obj["tokens"][:-1]
        assert train["labels"].tolist() == obj["tokens"][1:]
        assert train["loss_mask"].tolist() == obj["loss_mask"][1:]
        assert len(obj["modes"]) == len(split_pieces(ds.context(obj["index"]).tolist(), tok.eod))
        modes += obj["modes"]
        original = [b"".join(tok.token_bytes[t] for t in p) for p in split_pieces(ds.context(obj["index"]).tolist(), tok.eod)]
        restored = unpermute(obj["tokens"], tok)
        assert restored[:-1] == original[:len(restored) - 1]
    assert {"psm", "spm"} <= set(modes)


def test_text_output_shows_sentinels_and_masked_spans(dataset, small_model):  # noqa: F811
    text = run_tool(["--data-path", dataset, "--tokenizer-model", small_model, "--seq-length", "40",
                     "--fim-rate", "1", "--fim-spm-rate", "0", "--mask-sentinels", "--num-samples", "2"])
    assert text.count("=== sample") == 2
    assert "[[masked: <fim_prefix>]]" in text and "<fim_middle>" in text
    assert "<|endoftext|>" in text
    plain = run_tool(["--data-path", dataset, "--tokenizer-model", small_model, "--seq-length", "40"])
    assert "pieces ar" in plain and "<fim_" not in plain and "[[masked" not in plain


def test_command_line(dataset, small_model):  # noqa: F811
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_samples.py"), "--data-path", dataset,
                           "--tokenizer-model", small_model, "--seq-length", "32", "--fim-rate", "0.5",
                           "--start", "1", "--num-samples", "1", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["index"] == 1
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_samples.py"), "--data-path", dataset,
                          "--tokenizer-model", small_model, "--seq-length", "32", "--fim-rate", "1.5"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "FimConfig.rate" in bad.stderr
