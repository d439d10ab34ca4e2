"""A small tokenizer trained once per test session with tools/train_tokenizer.py, for the tokenizer
tests (import the fixtures from here)."""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Text the stdlib rarely has, so that a few non-ASCII characters become pieces and others stay bytes.
EXTRA_TEXT = "π≈3.14 — naïve café, ü ö ä, 日本語のテキスト, ∑ x² ≤ y ½ 😀\n\tindented\ttabs\n" * 5


def load_train_tool():
    """tools/train_tokenizer.py as a module (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_tokenizer", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def stdlib_files(limit: int | None = None, step: int = 1) -> list[Path]:
    """The stdlib's *.py files (not site-packages), sorted; every ``step``-th one, at most ``limit``."""
    files = []
    for path in sorted(STDLIB.rglob("*.py")):
        rel = path.relative_to(STDLIB).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        files.append(path)
    return files[::step][:limit]


@pytest.fixture(scope="session")
def train_tool():
    return load_train_tool()


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, train_tool) -> str:
    """A 2000-piece model trained on ~250 stdlib files; returns the .model path."""
    d = tmp_path_factory.mktemp("tokenizer")
    extra = d / "extra.txt"
    extra.write_text(EXTRA_TEXT, encoding="utf-8")
    inputs = [str(p) for p in stdlib_files(limit=250, step=8)] + [str(extra)]
    config = train_tool.TrainConfig(inputs=inputs, vocab_size=2000, output_prefix=str(d / "small"), threads=2)
    train_tool.train(config, log=lambda *_: None)
    return str(d / "small.model")


@pytest.fixture(scope="session")
def small_tokenizer(small_model):
    from megafim.data.tokenizer import Tokenizer

    return Tokenizer.from_file(small_model)


@pytest.fixture(scope="session")
def sp_tokenizer(small_model):
    """The same model on the pure-sentencepiece path: the reference for the C++ encoder."""
    from megafim.data.tokenizer import Tokenizer

    return Tokenizer.from_file(small_model, backend="sentencepiece")
