"""tools/merge_datasets.py and megafim.data.indexed.merge_datasets: shards joined in order give the
same bytes as one run over the whole corpus (and as megatron-core's add_index)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megafim.data.indexed import IndexedDataset, IndexedDatasetBuilder, find_datasets, merge_datasets
from megafim.data.preprocess import PreprocessConfig, run_preprocess

REPO = Path(__file__).resolve().parents[2]


def preprocess(inputs, prefix, model) -> str:
    run_preprocess(PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(prefix),
                                    tokenizer_model=str(model), append_eod=True, progress=False, workers=2))
    return f"{prefix}_text_document"


def files_of(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_merged_shards_equal_one_run(tmp_path, small_tokenizer_path):
    lines = [json.dumps({"text": f"def f{i}(x):\n    return {i} * x\n" * (i % 5 + 1)}) for i in range(90)]
    (tmp_path / "shards").mkdir()
    for s in range(3):
        (tmp_path / f"shard{s}.jsonl").write_text("\n".join(lines[s * 30:(s + 1) * 30]) + "\n")
        preprocess([tmp_path / f"shard{s}.jsonl"], tmp_path / "shards" / f"part{s}", small_tokenizer_path)
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    whole = preprocess([tmp_path / "all.jsonl"], tmp_path / "whole", small_tokenizer_path)

    out = subprocess.run([sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input",
                          str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "merged")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "merged 3 datasets" in out.stderr and "90 documents" in out.stderr
    assert files_of(tmp_path / "merged") == files_of(whole)

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as McoreBuilder

    ref = McoreBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for prefix in find_datasets(tmp_path / "shards"):
        ref.add_index(prefix)
    ref.finalize(str(tmp_path / "ref.idx"))
    assert files_of(tmp_path / "ref") == files_of(whole)


def test_merge_keeps_multi_sequence_documents(tmp_path):
    def write(prefix, docs, dtype=np.uint16):
        with IndexedDatasetBuilder(prefix, dtype=dtype) as b:
            for doc in docs:
                b.add_document(np.concatenate(doc), [len(s) for s in doc])
        return str(prefix)

    a = write(tmp_path / "a", [[np.arange(3), np.arange(2)], [np.arange(4)]])
    b = write(tmp_path / "b", [[np.arange(5)], [np.arange(1), np.arange(1), np.arange(6)]])
    merged = merge_datasets([a, b], tmp_path / "m")
    assert merged.document_indices.tolist() == [0, 2, 3, 4, 7]
    assert [len(merged[i]) for i in range(len(merged))] == [3, 2, 4, 5, 1, 1, 6]
    np.testing.assert_array_equal(merged.document(3), np.concatenate([[0], [0], np.arange(6)]))


def test_merge_refuses_mixed_dtypes_and_self_overwrite(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "u16", dtype=np.uint16) as b:
        b.add_document([1, 2])
    with IndexedDatasetBuilder(tmp_path / "i32", dtype=np.int32) as b:
        b.add_document([70000])
    with pytest.raises(ValueError, match=r"dtypes differ: .*u16 \(uint16\), .*i32 \(int32\)"):
        merge_datasets([str(tmp_path / "u16"), str(tmp_path / "i32")], tmp_path / "out")
    assert not (tmp_path / "out.idx").exists() and not list(tmp_path.glob("out*"))
    with pytest.raises(ValueError, match="also an input"):
        merge_datasets([str(tmp_path / "u16")], str(tmp_path / "u16"))
    out = subprocess.run([sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input",
                          str(tmp_path / "u16"), str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "missing.idx exists" in out.stderr and len(out.stderr.splitlines()) == 1
    assert len(IndexedDataset(tmp_path / "u16")) == 1
