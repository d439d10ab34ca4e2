"""The C++ preprocessing pipeline (csrc/preprocess_pipeline.cpp) through megafim.data.preprocess:
ids equal to Tokenizer.encode, output equal to megatron-core's builder, every bad-input case, and
independence from block size and thread count."""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from megafim.data.indexed import IndexedDataset
from megafim.data.preprocess import PreprocessConfig, format_summary, resolve_inputs, run_preprocess
from megafim.data.tokenizer import Tokenizer, load_tokenizer
from tests.data.hf_tokenizer_fixtures import gpt2_fim, hf_dir  # noqa: F401

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "import os\r\n\r\n\tprint(os.sep)  # tabs, CRLF\n",
    "π ≈ 3.14159 — ünïcode, emoji 😀, CJK 中文",
    "quote \" backslash \\ slash / controls \b\f\x01",
    "  leading and trailing spaces  ",
    "\u2581 sentencepiece's space symbol, kept as bytes",
]


@pytest.fixture(scope="module", params=["sentencepiece", "huggingface"])
def tok(request, small_tokenizer_path) -> Tokenizer:
    """Every test runs with both backends: the C++ encoder, and a Hugging Face byte-level BPE
    tokenizer.json whose texts the pipeline hands to the tokenizers library one job at a time."""
    if request.param == "huggingface":
        return load_tokenizer(request.getfixturevalue("gpt2_fim"))
    return Tokenizer.from_file(small_tokenizer_path)


def preprocess(tmp_path: Path, inputs, tok: Tokenizer, **kw) -> dict:
    kw.setdefault("output_prefix", str(tmp_path / "out"))
    config = PreprocessConfig(inputs=[str(i) for i in inputs], tokenizer_model=tok.model_path, progress=False, **kw)
    return run_preprocess(config)


def write_jsonl(path: Path, records: list, newline: str = "\n") -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + newline.encode()
                             for r in records))
    return path


def test_ids_are_tokenizer_encode_and_megatron_core_reads_them(tmp_path, tok):
    records = [{"text": t, "title": f"title {i}", "id": i} for i, t in enumerate(TEXTS)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    summary = preprocess(tmp_path, [src], tok, json_keys=["text", "title"], append_eod=True, workers=2)
    assert summary["documents"] == len(TEXTS) and not summary["skipped"]
    from megatron.core.datasets.indexed_dataset import IndexedDataset as McoreDataset

    for key in ("text", "title"):
        ds = IndexedDataset(tmp_path / f"out_{key}_document", full_check=True)
        theirs = McoreDataset(str(tmp_path / f"out_{key}_document"))
        assert ds.dtype == np.uint16 and len(ds) == len(TEXTS)
        for i, r in enumerate(records):
            assert ds[i].tolist() == tok.encode(r[key]) + [tok.eod]
            assert tok.decode(ds[i][:-1]) == r[key]
            np.testing.assert_array_equal(theirs[i], ds[i])
    assert summary["tokens"] == sum(len(tok.encode(r[k])) + 1 for r in records for k in ("text", "title"))


def test_same_bytes_as_megatron_core_builder(tmp_path, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS * 3])
    preprocess(tmp_path, [src], tok, append_eod=True)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for t in TEXTS * 3:
        ids = tok.encode(t) + [tok.eod]
        ref.add_document(torch.tensor(ids), [len(ids)])
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"out_text_document{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


BAD_LINES = [
    ({"text": "good one"}, None),
    (b'{"text": "unterminated}', "malformed_json"),
    ({"other": "no text key"}, "missing_key"),
    ({"text": ["a", "list"]}, "not_a_string"),
    (b'{"text": "raw \xff byte"}', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    ({"text": ""}, "empty_document"),
    (b"   ", None),  # blank: ignored, counted apart
    (b"[1, 2]", "malformed_json"),
    ({"text": "good two"}, None),
]


def test_bad_lines_are_skipped_and_reported_with_line_numbers(tmp_path, tok):
    src = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_LINES])
    summary = preprocess(tmp_path, [src], tok)
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["good one", "good two"]
    expect: dict[str, list] = {}
    for line, (_, reason) in enumerate(BAD_LINES, start=1):
        if reason:
            expect.setdefault(reason, []).append((str(src), line))
    assert summary["skipped"] == {k: len(v) for k, v in expect.items()}
    assert {k: [tuple(x) for x in v] for k, v in summary["skipped_examples"].items()} == expect
    assert summary["blank_lines"] == 1 and summary["documents"] == 2
    report = format_summary(summary)
    assert f"malformed_json: 2 (first: {src}:2, {src}:9)" in report
    assert f"invalid_utf8: 2 (first: {src}:5, {src}:6)" in report


def test_strict_stops_at_first_bad_line_and_keeps_old_output(tmp_path, tok):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "old"}])
    preprocess(tmp_path, [good], tok)
    before = (tmp_path / "out_text_document.idx").read_bytes(), (tmp_path / "out_text_document.bin").read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_LINES])
    with pytest.raises(ValueError, match=rf"{bad}:2: malformed_json"):
        preprocess(tmp_path, [bad], tok, strict=True)
    after = (tmp_path / "out_text_document.idx").read_bytes(), (tmp_path / "out_text_document.bin").read_bytes()
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_missing_key_in_one_of_several_keys_skips_the_line(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", [{"a": "x", "b": "y"}, {"a": "only a"}, {"a": "p", "b": ""}, {"a": "q", "b": "r"}])
    summary = preprocess(tmp_path, [src], tok, json_keys=["a", "b"])
    assert summary["skipped"] == {"missing_key": 1, "empty_document": 1}
    for key, expect in (("a", ["x", "q"]), ("b", ["y", "r"])):
        ds = IndexedDataset(tmp_path / f"out_{key}_document")
        assert [tok.decode(ds[i]) for i in range(len(ds))] == expect


def random_corpus(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    alphabet = "abc xyz\n\t()=:.,_0123456789éπ😀\"\\"
    out = [{"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))} for _ in range(n)]
    out[n // 2]["text"] = "long line " * 2000  # longer than the small blocks below
    return out


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_block_size_and_workers_do_not_change_the_output(tmp_path, tok, newline):
    src = write_jsonl(tmp_path / "in.jsonl", random_corpus(0, 400), newline)
    src.write_bytes(src.read_bytes().rstrip(b"\r\n"))  # the last line has no newline
    outputs = []
    for i, (block, workers) in enumerate([(1 << 20, 1), (97, 3), (4096, 2)]):
        summary = preprocess(tmp_path, [src], tok, output_prefix=str(tmp_path / f"o{i}"), block_bytes=block,
                             workers=workers, append_eod=True)
        # Memory bound: the jobs in flight, plus the one being read and the one being written.
        assert summary["max_jobs_in_flight"] == 2 * workers + 2
        assert 1 <= summary["peak_jobs_in_memory"] <= summary["max_jobs_in_flight"] + 2
        outputs.append(tuple((tmp_path / f"o{i}_text_document{e}").read_bytes() for e in (".bin", ".idx")))
    assert outputs[0] == outputs[1] == outputs[2]
    ds = IndexedDataset(tmp_path / "o0_text_document")
    assert len(ds) == 400
    for i, r in enumerate(random_corpus(0, 400)):
        if i % 37 == 0 or i == 200:
            assert tok.decode(ds[i][:-1]) == r["text"]


def test_line_numbers_across_files_and_blocks(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"doc {i}"} for i in range(30)] + [b"oops"] + [{"text": "end"}])
    summary = preprocess(tmp_path, [tmp_path / "*.jsonl"], tok, block_bytes=64, workers=2)
    assert summary["skipped_examples"] == {"malformed_json": [(str(b), 31)]}
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert len(ds) == 81 and tok.decode(ds[0]) == "doc 0" and tok.decode(ds[80]) == "end"
    assert summary["input_bytes"] == a.stat().st_size + b.stat().st_size


def test_source_files_one_document_per_file(tmp_path, tok):
    root = tmp_path / "src"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    files = {"a.py": "print('a')\n", "pkg/b.py": "x = 1\n# é\n", "pkg/c.txt": "notes\n", "z.c": "int main(){}\n"}
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "pkg" / "__pycache__" / "b.cpython-311.py").write_text("cached = True\n")
    (root / "pkg" / "empty.py").write_text("")
    (root / "pkg" / "latin1.py").write_bytes(b"ok = 1\n# caf\xe9\n")
    (root / "data.bin").write_bytes(b"\0\1")
    summary = preprocess(tmp_path, [root], tok, append_eod=True)
    ds = IndexedDataset(tmp_path / "out_text_document")
    got = [tok.decode(ds[i][:-1]) for i in range(len(ds))]
    order, _ = resolve_inputs([str(root)])
    expect = [Path(p).read_text() for p in order if Path(p).stat().st_size and not p.endswith("latin1.py")]
    assert got == expect and sorted(got) == sorted(files.values())
    assert summary["skipped_examples"] == {"empty_document": [(str(root / "pkg" / "empty.py"), 1)],
                                           "invalid_utf8": [(str(root / "pkg" / "latin1.py"), 2)]}

    # a glob of source files: the same documents, in sorted path order
    summary = preprocess(tmp_path, [root / "**" / "*.py"], tok, output_prefix=str(tmp_path / "g"))
    ds = IndexedDataset(tmp_path / "g_text_document")
    py_files = sorted(str(p) for p in root.rglob("*.py"))
    assert [tok.decode(ds[i]) for i in range(len(ds))] == [
        Path(p).read_text() for p in py_files if not p.endswith(("empty.py", "latin1.py"))]
    assert summary["inputs"] == len(py_files)  # (the glob does not skip __pycache__, a directory walk does)


def test_inputs_are_checked(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no-such"):
        preprocess(tmp_path, [tmp_path / "no-such.jsonl"], tok)
    write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])
    (tmp_path / "y.py").write_text("b\n")
    with pytest.raises(ValueError, match="mix JSONL"):
        preprocess(tmp_path, [tmp_path / "x.jsonl", tmp_path / "y.py"], tok)
    with pytest.raises(ValueError, match="workers 0"):
        PreprocessConfig(inputs=["x"], output_prefix="o", tokenizer_model="m", workers=0)
    with pytest.raises(FileNotFoundError, match="tokenizer model"):
        run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "x.jsonl")], output_prefix=str(tmp_path / "o"),
                                        tokenizer_model=str(tmp_path / "nope.model"), progress=False))


def test_stdlib_sample_round_trip(tmp_path, tok):
    """Every 25th stdlib file, as one document each: decoding gives the file's text back."""
    files, _ = resolve_inputs([str(STDLIB)])
    sample = [f for f in files[::25] if os.path.getsize(f) < 200_000]
    summary = preprocess(tmp_path, sample, tok, workers=2, append_eod=True)
    ds = IndexedDataset(tmp_path / "out_text_document", full_check=True)
    texts = []
    for f in sample:
        try:
            text = Path(f).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            texts.append(text)
    assert len(ds) == len(texts) == summary["documents"]
    for i, text in enumerate(texts):
        assert ds[i][-1] == tok.eod and tok.decode(ds[i][:-1]) == text


def test_a_failing_batch_encoder_leaves_no_output(tmp_path, gpt2_fim, monkeypatch):  # noqa: F811
    from megafim.data.tokenizer_hf import HFTokenizer

    def broken(self, texts):
        raise RuntimeError("encoder broke")

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    monkeypatch.setattr(HFTokenizer, "encode_flat", broken)
    config = PreprocessConfig(inputs=[str(src)], tokenizer_model=str(gpt2_fim), progress=False,
                              output_prefix=str(tmp_path / "out"), workers=2)
    with pytest.raises(RuntimeError, match="tokenizer: RuntimeError: encoder broke"):
        run_preprocess(config)
    assert not list(tmp_path.glob("out*"))


def test_tokenizer_type_is_checked(tmp_path, gpt2_fim, small_tokenizer_path):  # noqa: F811
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    for model, kind, message in [(str(gpt2_fim), "GPTSentencePieceTokenizer", "not a sentencepiece model"),
                                 (small_tokenizer_path, "HuggingFaceTokenizer", "not a Hugging Face tokenizer")]:
        config = PreprocessConfig(inputs=[str(src)], tokenizer_model=model, tokenizer_type=kind, progress=False,
                                  output_prefix=str(tmp_path / "out"))
        with pytest.raises(ValueError, match=message):
            run_preprocess(config)
