"""Fixtures for the trainer tests: a tiny tokenizer and dataset built by the real tools."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.training.launcher import REPO

# A few small stdlib packages: ~1 MB of Python, tokenized in about a second.
CORPUS = ("json", "email", "collections", "asyncio")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data prefix, tokenizer model) for a 512-token BPE over a slice of the standard library."""
    out = tmp_path_factory.mktemp("tiny_data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / name) for name in CORPUS]
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", *inputs[:3], "--vocab-size", "512",
                    "--output-prefix", str(out / "tok")], cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", *inputs, "--output-prefix",
                    str(out / "data"), "--tokenizer-model", str(out / "tok.model"), "--append-eod", "--quiet"],
                   cwd=REPO, check=True, capture_output=True)
    return str(out / "data_text_document"), str(out / "tok.model")


