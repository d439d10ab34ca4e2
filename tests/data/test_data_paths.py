"""User-given dataset paths (resolve_dataset_prefix, DataConfig.check_files) and the one-line errors
of tools/inspect_samples.py and tools/merge_datasets.py for a wrong path or tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megafim.data.builder import build_datasets
from megafim.data.config import DataConfig
from megafim.data.indexed import IndexedDatasetBuilder, resolve_dataset_prefix
from megafim.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_tokenizer_path) -> Path:
    """``stdlib_text_document`` (made with the small tokenizer) and ``big_ids`` (ids past its vocabulary)."""
    d = tmp_path_factory.mktemp("paths")
    tok = Tokenizer.from_file(small_tokenizer_path)
    with IndexedDatasetBuilder(d / "stdlib_text_document") as b:
        for i in range(40):
            b.add_document(np.asarray(tok.encode(f"def f_{i}(x):\n    return x * {i}\n") + [tok.eod]))
    with IndexedDatasetBuilder(d / "big_ids", dtype=np.uint16) as b:
        for i in range(40):
            b.add_document(np.arange(5000, 5050))
    return d


def test_prefix_bin_and_idx_paths_name_the_same_dataset(data_dir):
    prefix = str(data_dir / "stdlib_text_document")
    for given in (prefix, prefix + ".bin", prefix + ".idx", Path(prefix + ".bin")):
        assert resolve_dataset_prefix(given, "--data-path") == prefix


def test_missing_datasets_are_explained(data_dir, tmp_path):
    stem = str(data_dir / "stdlib")
    with pytest.raises(FileNotFoundError, match=rf"^--data-path {stem}: no {stem}\.bin/\.idx; did you mean "
                                                 rf"{stem}_text_document\?"):
        resolve_dataset_prefix(stem, "--data-path")
    with pytest.raises(FileNotFoundError, match=rf"^data\.data_path {stem}\.bin: .*did you mean {stem}_text_document"):
        resolve_dataset_prefix(stem + ".bin", "data.data_path")
    nothing = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=rf"neither {nothing}\.bin nor {nothing}\.idx exists"):
        resolve_dataset_prefix(nothing)
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"half\.bin exists but .*half\.idx does not"):
        resolve_dataset_prefix(tmp_path / "half.idx", "--data-path")
    with pytest.raises(FileNotFoundError, match=rf"--data-path {data_dir}: is a directory; .* it holds .*big_ids"):
        resolve_dataset_prefix(data_dir, "--data-path")


def test_data_config_takes_bin_paths_and_names_the_field(data_dir):
    prefix = str(data_dir / "stdlib_text_document")
    config = DataConfig(data_paths=(prefix + ".bin",), split="1", seq_length=16)
    assert config.check_files().data_paths == (prefix,)
    train = build_datasets(config, (4, 0, 0))["train"]
    assert len(train) == 4
    with pytest.raises(FileNotFoundError, match=r"^DataConfig\.data_paths .*stdlib: .*did you mean"):
        DataConfig(data_paths=(str(data_dir / "stdlib"),)).check_files()
    with pytest.raises(FileNotFoundError, match=r"^--data-path .*stdlib: "):
        DataConfig(data_paths=(str(data_dir / "stdlib"),)).check_files("--data-path")


def run_tool(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def one_line_error(out: subprocess.CompletedProcess, tool: str) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), out.stderr
    return lines[0]


def test_inspect_samples_errors_are_one_line(data_dir, small_tokenizer_path, tmp_path):
    common = ["--seq-length", "16"]
    ok = run_tool("inspect_samples.py", "--data-path", data_dir / "stdlib_text_document.bin",
                  "--tokenizer-model", small_tokenizer_path, *common)
    assert ok.returncode == 0 and "=== sample 0" in ok.stdout, ok.stderr

    line = one_line_error(run_tool("inspect_samples.py", "--data-path", data_dir / "stdlib", "--tokenizer-model",
                                   small_tokenizer_path, *common), "inspect_samples")
    assert f"--data-path {data_dir / 'stdlib'}: " in line and "did you mean" in line
    line = one_line_error(run_tool("inspect_samples.py", "--data-path", data_dir / "stdlib_text_document",
                                   "--tokenizer-model", tmp_path / "no.model", *common), "inspect_samples")
    assert "--tokenizer-model: " in line and "no.model" in line
    line = one_line_error(run_tool("inspect_samples.py", "--data-path", data_dir / "stdlib_text_document",
                                   "--tokenizer-model", data_dir / "stdlib_text_document.idx", *common),
                          "inspect_samples")
    assert "--tokenizer-model: " in line and "not a sentencepiece model" in line
    line = one_line_error(run_tool("inspect_samples.py", "--data-path", data_dir / "big_ids", "--tokenizer-model",
                                   small_tokenizer_path, *common), "inspect_samples")
    assert "holds token id 50" in line and "another tokenizer" in line
    line = one_line_error(run_tool("inspect_samples.py", "--data-path", data_dir / "stdlib_text_document",
                                   "--tokenizer-model", small_tokenizer_path, *common, "--start", "10000"),
                          "inspect_samples")
    assert "--start 10000: " in line


def test_merge_datasets_takes_bin_paths_and_fails_in_one_line(data_dir, tmp_path):
    a = data_dir / "stdlib_text_document"
    out = run_tool("merge_datasets.py", "--input", f"{a}.bin", f"{a}.idx", "--output-prefix", tmp_path / "m")
    assert out.returncode == 0, out.stderr
    line = one_line_error(run_tool("merge_datasets.py", "--input", data_dir / "stdlib", "--output-prefix",
                                   tmp_path / "n"), "merge_datasets")
    assert "--input " in line and "did you mean" in line
