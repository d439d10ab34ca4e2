"""tools/inspect_samples.py shows each sample's documents: the segments --reset-attention-mask uses."""

from __future__ import annotations

import json

import numpy as np

from megafim.data.fim import FimConfig, FimTransform
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec
from tests.data.test_fim_fixtures import fim_tokenizer, small_model, train_tool  # noqa: F401
from tests.data.test_fim_inspect import dataset, run_tool  # noqa: F401


def test_segments_are_the_training_documents(dataset, small_model, fim_tokenizer):  # noqa: F811
    tok = fim_tokenizer
    args = ["--data-path", dataset, "--tokenizer-model", small_model, "--seq-length", "64", "--fim-rate", "0.9",
            "--seed", "7", "--num-samples", "3"]
    ds = GPTDataset(GPTDatasetSpec(path_prefix=dataset, seq_length=64, seed=7),
                    fim=FimTransform(FimConfig(rate=0.9), tok), document_eod=tok.eod)
    for line in run_tool(args + ["--json"]).splitlines():
        obj = json.loads(line)
        seg, tokens = obj["segment_ids"], obj["tokens"]
        sample = ds[obj["index"]]
        assert sample["segment_ids"].tolist() == seg[:-1] and sample["label_segment_ids"].tolist() == seg[1:]
        ends = [t for t, token in enumerate(tokens[:-1]) if token == tok.eod]
        assert np.flatnonzero(np.diff(seg)).tolist() == ends  # a new document right after each end-of-text
        assert seg[-1] >= 1
    text = run_tool(args)
    first = json.loads(run_tool(args + ["--json"]).splitlines()[0])["segment_ids"]
    lengths = ", ".join(str(first.count(s)) for s in range(first[-1] + 1))
    assert f"; {first[-1] + 1} documents of {lengths} tokens\n" in text
