"""Repository-level documents (preprocess --group-by-key / --path-key, csrc/repo_grouper.h): the output
equals a slow obvious definition (read every record, group, sort by path, join, encode) with both
tokenizer backends, whatever the block size, workers and interleaving; an oversized repository is
split as documented; every bad input is one line and exit code 2; tokenizers without the repository
tokens still load and preprocess."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megafim.data.indexed import IndexedDataset
from megafim.data.preprocess import PreprocessConfig, run_preprocess
from megafim.data.tokenizer import Tokenizer, load_tokenizer
from tests.data.hf_tokenizer_fixtures import hf_dir, llama3_fim, llama3_plain  # noqa: F401
from tests.data.test_tokenizer_fixtures import load_train_tool, stdlib_files

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "preprocess_data.py"
CONTENTS = ["def f(x):\n    return x + 1\n", "import os\n", "π ≈ 3.14 — ünïcode 😀\n", "", "class A:\n    pass\n",
            "  x = 'quote \" \\\\'\n", "# comment\n\n\n", "print(1)"]


@pytest.fixture(scope="module")
def hf_repo_tokenizer(hf_dir, llama3_plain):  # noqa: F811
    """A Hugging Face tokenizer given <repo_name> / <file_sep> by add_fim_tokens(repo_tokens=True)."""
    from megafim.data.tokenizer_hf import add_fim_tokens

    return add_fim_tokens(llama3_plain, hf_dir / "llama3_repo", repo_tokens=True)[0].parent


@pytest.fixture(scope="module", params=["sentencepiece", "huggingface"])
def tok(request, small_tokenizer_path):
    if request.param == "huggingface":
        return load_tokenizer(request.getfixturevalue("hf_repo_tokenizer"))
    return Tokenizer.from_file(small_tokenizer_path)


def make_records(n_repos: int, files_per_repo: int, seed: int, interleave: bool) -> list[dict]:
    rng = random.Random(seed)
    records = [{"repo": f"org{r}/name-{r}", "path": f"{rng.choice('abcz')}/{rng.randrange(100)}_{f}.py",
                "text": rng.choice(CONTENTS), "stars": f}
               for r in range(n_repos) for f in range(files_per_repo)]
    if interleave:
        rng.shuffle(records)
    return records


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def reference(records: list[dict], tok, append_eod: bool) -> list[list[int]]:
    """The definition: repositories in the order of their first record, each one document of its files
    sorted by path (ties in input order), special tokens as ids, the rest encoded as text."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["repo"], []).append(r)
    docs = []
    for name, files in groups.items():
        ids = [tok.repo_name] + tok.encode(name)
        for f in sorted(files, key=lambda f: f["path"].encode()):
            ids += [tok.file_sep] + tok.encode(f["path"] + "\n" + f["text"])
        docs.append(ids + ([tok.eod] if append_eod else []))
    return docs


def grouped(tmp_path: Path, inputs, tok, **kw) -> tuple[list[list[int]], dict]:
    kw.setdefault("output_prefix", str(tmp_path / "out"))
    config = PreprocessConfig(inputs=[str(i) for i in inputs], tokenizer_model=tok.model_path, progress=False,
                              group_by_key="repo", path_key="path", **kw)
    summary = run_preprocess(config)
    ds = IndexedDataset(tmp_path / "out_text_document", full_check=True)
    return [ds[i].tolist() for i in range(len(ds))], summary


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("workers,block_bytes", [(1, 1 << 20), (2, 97)])
def test_equals_the_obvious_definition(tmp_path, tok, interleave, workers, block_bytes):
    records = make_records(n_repos=7, files_per_repo=6, seed=workers + 3 * interleave, interleave=interleave)
    half = len(records) // 2  # two input files: a repository may continue from one into the next
    inputs = [write_jsonl(tmp_path / "a.jsonl", records[:half]), write_jsonl(tmp_path / "b.jsonl", records[half:])]
    docs, summary = grouped(tmp_path, inputs, tok, append_eod=True, workers=workers, block_bytes=block_bytes)
    assert docs == reference(records, tok, append_eod=True)
    assert summary["documents"] == 7 and summary["grouped_records"] == len(records)
    assert summary["split_groups"] == 0 and summary["tokens"] == sum(map(len, docs))
    text = tok.decode(docs[0])
    first = records[0]["repo"]
    assert text.startswith(f"<repo_name>{first}<file_sep>") and text.count("<file_sep>") == 6


def test_bad_lines_are_skipped_and_megatron_core_reads_the_output(tmp_path, small_tokenizer_path):
    tok = Tokenizer.from_file(small_tokenizer_path)
    records = make_records(n_repos=3, files_per_repo=3, seed=1, interleave=False)
    lines = records[:4] + ["not json", '{"repo": "org0/name-0", "path": "p.py", "text": 7}', ""] + records[4:]
    docs, summary = grouped(tmp_path, [write_jsonl(tmp_path / "in.jsonl", lines)], tok)
    assert docs == reference(records, tok, append_eod=False)
    assert summary["skipped"] == {"malformed_json": 1, "not_a_string": 1} and summary["blank_lines"] == 1
    from megatron.core.datasets.indexed_dataset import IndexedDataset as McoreDataset

    theirs = McoreDataset(str(tmp_path / "out_text_document"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == docs


def split_reference(records: list[dict], tok, bound: int) -> list[list[int]]:
    """One repository, in input order: greedy parts of at most ``bound`` text bytes (a bigger file alone),
    each part a document of its files sorted by path."""
    parts, part, size = [], [], 0
    for r in records:
        n = len((r["path"] + r["text"]).encode())
        if part and size + n > bound:
            parts.append(part)
            part, size = [], 0
        part.append(r)
        size += n
    parts.append(part)
    return [doc for p in parts for doc in reference(p, tok, append_eod=False)]


def test_an_oversized_repository_is_split(tmp_path, tok):
    records = [{"repo": "big/one", "path": f"f{(7 * i) % 20:02d}.py", "text": CONTENTS[i % 8] * (1 + i % 3)}
               for i in range(20)]
    records.append({"repo": "big/one", "path": "huge.py", "text": "x = 1\n" * 60})  # alone over the bound
    records.append({"repo": "small/two", "path": "a.py", "text": "y = 2\n"})
    docs, summary = grouped(tmp_path, [write_jsonl(tmp_path / "in.jsonl", records)], tok, max_group_bytes=200)
    assert docs == split_reference(records[:-1], tok, 200) + reference(records[-1:], tok, append_eod=False)
    assert len(docs) > 4 and all(d[0] == tok.repo_name for d in docs)
    assert summary["split_groups"] == 1
    assert [tuple(e) for e in summary["split_examples"]] == [("big/one", len(docs) - 1)]
    assert summary["peak_group_bytes"] <= len("huge.py" + records[-2]["text"])


def test_interleaving_beyond_the_bound_keeps_every_file_once(tmp_path, tok):
    records = make_records(n_repos=5, files_per_repo=8, seed=5, interleave=True)
    docs, summary = grouped(tmp_path, [write_jsonl(tmp_path / "in.jsonl", records)], tok, max_group_bytes=150)
    assert len(docs) > 5 and summary["peak_group_bytes"] <= 150
    seen = []
    for d in docs:
        text = tok.decode(d)
        head, *files = text.split("<file_sep>")
        assert head.startswith("<repo_name>") and files
        paths = [f.split("\n", 1)[0] for f in files]
        assert paths == sorted(paths, key=str.encode)
        seen += [(head[len("<repo_name>"):], *f.split("\n", 1)) for f in files]
    assert sorted(seen) == sorted((r["repo"], r["path"], r["text"]) for r in records)


# -- bad input: one line, exit code 2, the flag named, nothing written ---------------------------------

def run_tool(tmp_path, src, model, *extra):
    return subprocess.run([sys.executable, str(TOOL), "--input", str(src), "--output-prefix", str(tmp_path / "o"),
                           "--tokenizer-model", str(model), "--quiet", *extra], capture_output=True, text=True)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


GROUP = ("--group-by-key", "repo", "--path-key", "path")


def test_a_record_without_the_group_or_path_key(tmp_path, small_tokenizer_path):
    records = make_records(n_repos=2, files_per_repo=2, seed=0, interleave=False)
    src = write_jsonl(tmp_path / "in.jsonl", records[:2] + [{"path": "x.py", "text": "a"}] + records[2:])
    assert_one_line_error(run_tool(tmp_path, src, small_tokenizer_path, *GROUP), f"{src}:3:", "--group-by-key repo")
    src = write_jsonl(tmp_path / "in.jsonl", records[:3] + [{"repo": "r", "path": 5, "text": "a"}])
    assert_one_line_error(run_tool(tmp_path, src, small_tokenizer_path, *GROUP), f"{src}:4:", "--path-key path",
                          "non-string")
    first = write_jsonl(tmp_path / "first.jsonl", [{"name": "r", "path": "x.py", "text": "a"}] + records)
    assert_one_line_error(run_tool(tmp_path, first, small_tokenizer_path, *GROUP), f"{first}:1:", "--group-by-key")
    assert not list(tmp_path.glob("o_*"))


def test_flag_errors(tmp_path, small_tokenizer_path):
    src = write_jsonl(tmp_path / "in.jsonl", make_records(n_repos=1, files_per_repo=2, seed=0, interleave=False))
    assert_one_line_error(run_tool(tmp_path, src, small_tokenizer_path, "--path-key", "path"), "--path-key",
                          "--group-by-key")
    assert_one_line_error(run_tool(tmp_path, src, small_tokenizer_path, "--group-by-key", "repo"), "--path-key")
    assert_one_line_error(run_tool(tmp_path, src, small_tokenizer_path, *GROUP, "--json-keys", "text", "repo"),
                          "--group-by-key", "one --json-keys")
    assert_one_line_error(run_tool(tmp_path, src, small_tokenizer_path, *GROUP, "--max-group-bytes", "0"),
                          "--max-group-bytes")
    source = tmp_path / "mod.py"
    source.write_text("x = 1\n")
    assert_one_line_error(run_tool(tmp_path, source, small_tokenizer_path, *GROUP), "--group-by-key", "JSONL")
    assert not list(tmp_path.glob("o_*"))


@pytest.fixture(scope="module")
def old_model(tmp_path_factory) -> str:
    """A model as tools/train_tokenizer.py trained them before <repo_name>/<file_sep>: FIM sentinels only."""
    tool = load_train_tool()
    d = tmp_path_factory.mktemp("old_tokenizer")
    saved = tool.CONTROL_PIECES
    tool.CONTROL_PIECES = tool.FIM_PIECES
    try:
        config = tool.TrainConfig(inputs=[str(p) for p in stdlib_files(limit=40, step=20)], vocab_size=800,
                                  output_prefix=str(d / "old"), threads=1)
        tool.train(config, log=lambda *_: None)
    finally:
        tool.CONTROL_PIECES = saved
    return str(d / "old.model")


def test_old_tokenizers_still_work_and_grouping_says_how_to_get_the_tokens(tmp_path, old_model, llama3_fim):  # noqa: F811
    old = Tokenizer.from_file(old_model)
    assert old.repo_name is None and old.file_sep is None and old.backend == "native"
    assert (old.eod, old.fim_prefix, old.fim_middle, old.fim_suffix, old.fim_pad) == (1, 2, 3, 4, 5)
    src = write_jsonl(tmp_path / "in.jsonl", [{"repo": f"r{i % 2}", "path": f"{i}.py", "text": f"x = {i}\n"}
                                              for i in range(4)])
    plain = run_tool(tmp_path, src, old_model)
    assert plain.returncode == 0, plain.stderr
    assert len(IndexedDataset(tmp_path / "o_text_document")) == 4
    assert_one_line_error(run_tool(tmp_path / "g", src, old_model, *GROUP), "--group-by-key", "<repo_name>",
                          "train_tokenizer.py")
    assert_one_line_error(run_tool(tmp_path / "h", src, llama3_fim, *GROUP), "--group-by-key",
                          "add_fim_tokens.py --repo-tokens")
    assert not list(tmp_path.glob("g/o_*")) and not list(tmp_path.glob("h/o_*"))


def test_add_fim_tokens_repo_tokens(tmp_path, llama3_plain, hf_repo_tokenizer):  # noqa: F811
    tok = load_tokenizer(hf_repo_tokenizer)
    assert tok.special_pieces["repo_name"] == "<repo_name>" and tok.special_pieces["file_sep"] == "<file_sep>"
    assert tok.repo_name == tok.vocab_size - 2 and tok.file_sep == tok.vocab_size - 1
    assert tok.decode([tok.repo_name, *tok.encode("a/b"), tok.file_sep]) == "<repo_name>a/b<file_sep>"
    assert tok.repo_name not in tok.encode("<repo_name>x")  # text never becomes the special id
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "add_fim_tokens.py"), "--tokenizer", str(llama3_plain),
                           "--output", str(tmp_path / "t"), "--repo-tokens"], capture_output=True, text=True)
    assert proc.returncode == 0 and "<repo_name>=" in proc.stdout and "<file_sep>=" in proc.stdout, proc.stderr


def test_inspect_samples_shows_the_repository_tokens(tmp_path, small_tokenizer_path):
    records = [{"repo": "org/x", "path": p, "text": t} for p, t in (("b.py", "y = 2\n"), ("a.py", "x = 1\n"))]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert run_tool(tmp_path, src, small_tokenizer_path, *GROUP, "--append-eod").returncode == 0
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_samples.py"), "--data-path",
                           str(tmp_path / "o_text_document"), "--tokenizer-model", str(small_tokenizer_path),
                           "--seq-length", "20"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "<repo_name>org/x<file_sep>a.py\nx = 1\n<file_sep>b" in proc.stdout, proc.stdout


def test_export_keeps_the_repository_tokens(tmp_path, small_tokenizer_path):
    """tools/convert_checkpoint_to_hf.py's tokenizer: <repo_name>/<file_sep> stay single special ids."""
    from tokenizers import Tokenizer as RustTokenizer

    from megafim.convert.hf_tokenizer import save_hf_tokenizer

    tok = Tokenizer.from_file(small_tokenizer_path)
    out = save_hf_tokenizer(tok, tmp_path / "hf")
    rust = RustTokenizer.from_file(str(out / "tokenizer.json"))
    ids = [tok.repo_name, *tok.encode("a/b"), tok.file_sep, *tok.encode("x.py\ny")]
    assert rust.encode("<repo_name>a/b<file_sep>x.py\ny", add_special_tokens=False).ids == ids
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert {"<repo_name>", "<file_sep>"} <= set(config["additional_special_tokens"])
