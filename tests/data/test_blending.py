"""Blending: exact proportions at every prefix, samples from the right dataset, sizes from weights."""

import numpy as np
import pytest
import torch

from megafim.data.blending import BlendedDataset, blending_indices, samples_per_dataset
from megafim.data.builder import build_datasets
from megafim.data.config import DataConfig
from tests.data.gpt_fixtures import numbered_documents, open_dataset, write_dataset


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three datasets whose tokens say which dataset they come from (100000 * dataset + ...)."""
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(1)
    prefixes = []
    for k in range(3):
        docs = [d + 100000 * k for d in numbered_documents([int(x) for x in rng.integers(1, 30, 40)])]
        prefixes.append(write_dataset(root / f"ds{k}", docs, dtype=np.int32))
    return prefixes


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1, 1], [0.9, 0.0999, 0.0001], [3, 0, 1]])
def test_proportions_exact_at_every_prefix(weights):
    size = 5000
    di, dsi = blending_indices(weights, size)
    assert di.dtype == np.int16 and dsi.dtype == np.int64 and len(di) == size
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.cumsum(np.eye(len(w), dtype=np.int64)[di], axis=0)  # (size, k) counts after n+1
    targets = np.outer(np.arange(1, size + 1), w)
    assert np.abs(counts - targets).max() < 1.0
    final = samples_per_dataset(di, len(w))
    assert all(abs(c - x * size) < 1 for c, x in zip(final, w))
    for d in range(len(w)):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert dsi[di == d].tolist() == list(range(final[d]))


def test_blending_input_errors():
    with pytest.raises(ValueError, match="weights"):
        blending_indices([0, 0], 10)
    with pytest.raises(ValueError, match="weights"):
        blending_indices([1, -1], 10)


def test_blended_datasets_from_config(three):
    cfg = DataConfig(data_paths=tuple(three), weights=(0.5, 0.3, 0.2), split="90,10,0", seq_length=8,
                     seed=3)
    out = build_datasets(cfg, (300, 20, 5), open_indexed=open_dataset)
    train, valid = out["train"], out["valid"]
    assert out["test"] is None  # split weight 0
    assert isinstance(train, BlendedDataset) and len(train) == 300 and len(valid) == 20
    # Each component was built with exactly the samples the blend takes from it.
    assert [len(d) for d in train.datasets] == samples_per_dataset(train.dataset_index, 3) == [150, 90, 60]
    for i in range(0, 300, 7):
        d, j = train.locate(i)
        item = train[i]
        assert torch.equal(item["tokens"], train.datasets[d][j]["tokens"])
        assert set((item["tokens"] // 100000).tolist()) == {d}  # tokens from dataset d only
        assert train.epoch_of(i) == train.datasets[d].epoch_of(j)


def test_unweighted_blend_follows_token_counts(three):
    cfg = DataConfig(data_paths=tuple(three), split="1", seq_length=8, seed=0)
    train = build_datasets(cfg, (1000, 0, 0), open_indexed=open_dataset)["train"]
    readers = [open_dataset(p) for p in three]
    tokens = [int(r.sequence_lengths.sum()) for r in readers]
    want = np.asarray(tokens) / sum(tokens) * 1000
    assert np.abs(np.asarray(samples_per_dataset(train.dataset_index, 3)) - want).max() < 1
    with pytest.raises(ValueError, match="sample count"):
        build_datasets(cfg, (None, 0, 0), open_indexed=open_dataset)


def test_zero_weight_dataset_is_never_built(three):
    cfg = DataConfig(data_paths=tuple(three), weights=(1, 0, 1), split="1", seq_length=8, seed=0)
    train = build_datasets(cfg, (50, 0, 0), open_indexed=open_dataset)["train"]
    assert train.datasets[1] is None and len(train) == 50
    with pytest.raises(ValueError, match="at least"):
        BlendedDataset([None, None], np.zeros(3, np.int16), np.arange(3))
