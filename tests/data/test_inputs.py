"""megafim/data/inputs.py: the one rule by which the tokenizer trainer and the preprocessor find files."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from megafim.data.inputs import find_input_files
from megafim.data.preprocess import resolve_inputs

REPO = Path(__file__).resolve().parents[2]


def load_train_tool():
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "proj"
    for rel in ["src/a.py", "src/b.rs", "src/notes.md", "src/image.png", "src/.hidden_file.py",
                ".venv/lib/dep.py", "src/.cache/c.py", "__pycache__/x.py", "node_modules/m.js",
                "lib/site-packages/s.py", "data/docs.jsonl", "data/more.ndjson"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    return root


def rel(root: Path, files) -> list[str]:
    return [os.path.relpath(f, root) for f in files]


def test_directories_skip_hidden_cache_and_package_directories(tree):
    found = find_input_files([str(tree)])
    assert rel(tree, found.files) == ["src/.hidden_file.py", "src/a.py", "src/b.rs", "src/notes.md"]
    # the directory given may itself be hidden: only directories below it are skipped
    assert rel(tree, find_input_files([str(tree / ".venv")]).files) == [".venv/lib/dep.py"]


def test_files_globs_pipes_and_order(tree):
    items = [str(tree / "data" / "docs.jsonl"), str(tree / "src" / "*.py"), str(tree / "src" / "a.py"),
             str(tree / "**" / "*.ndjson")]
    found = find_input_files(items)
    assert rel(tree, found.files) == ["data/docs.jsonl", "src/a.py", "data/more.ndjson"]  # a.py kept once
    assert rel(tree, found.jsonl) == ["data/docs.jsonl", "data/more.ndjson"] and rel(tree, found.sources) == [
        "src/a.py"]
    fifo = tree / "feed"
    os.mkfifo(fifo)
    assert find_input_files([str(fifo)]).files == (str(fifo),)


@pytest.mark.parametrize("item, message", [("missing.py", r"--input '.*missing\.py': no such file or directory"),
                                           ("*.nothing", r"--input '.*\*\.nothing': the glob matches no file"),
                                           ("empty", r"--input '.*empty': the directory holds no file")])
def test_errors_name_the_flag_and_item(tree, item, message):
    (tree / "empty" / ".git").mkdir(parents=True)
    (tree / "empty" / ".git" / "x.py").write_text("")
    with pytest.raises(FileNotFoundError, match=message):
        find_input_files([str(tree / item)])


def test_tokenizer_trainer_and_preprocessor_find_the_same_files(tree):
    """The rule the issue found differing: .venv was searched by one tool and not by the other."""
    tool = load_train_tool()
    config = tool.TrainConfig(inputs=[str(tree)], vocab_size=300, output_prefix=str(tree / "tok"))
    sources, jsonl = tool.collect_inputs(config)
    files, is_jsonl = resolve_inputs([str(tree)])
    assert [str(p) for p in sources] == files and not jsonl and not is_jsonl
    assert not any(".venv" in f or ".cache" in f for f in files)
    # both kinds: the trainer reads them together, the preprocessor refuses one run of both
    both = [str(tree / "src"), str(tree / "data" / "docs.jsonl")]
    sources, jsonl = tool.collect_inputs(tool.TrainConfig(inputs=both, vocab_size=300, output_prefix="t"))
    assert len(sources) == 4 and [p.name for p in jsonl] == ["docs.jsonl"]
    with pytest.raises(ValueError, match="mix JSONL"):
        resolve_inputs(both)
