"""GPTDataset over real .bin/.idx files: samples against the token stream, splits, workers, FIM."""

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from megafim.data.builder import build_datasets
from megafim.data.config import DataConfig, split_document_ranges
from megafim.data.fim import FimConfig
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec
from tests.data.gpt_fixtures import numbered_documents, open_dataset, write_dataset

L = 16


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """60 documents, some empty; token = 1000 * document + position, so each token names its origin."""
    rng = np.random.default_rng(0)
    lengths = [0 if d % 13 == 5 else int(rng.integers(1, 50)) for d in range(60)]
    docs = numbered_documents(lengths)
    prefix = write_dataset(tmp_path_factory.mktemp("gpt") / "num", docs, dtype=np.int32)
    return prefix, docs


def make(prefix, **kw):
    fields = dict(path_prefix=prefix, seq_length=L, seed=5)
    cache_dir = kw.pop("cache_dir", None)
    fields.update(kw)
    return GPTDataset(GPTDatasetSpec(**fields), open_dataset(prefix), cache_dir=cache_dir)


def stream_of(ds, docs):
    return np.concatenate([docs[int(d)] for d in ds.doc_order])


def test_item_shapes_dtypes_and_alignment(numbered):
    ds = make(numbered[0], num_samples=50)
    assert len(ds) == 50
    item = ds[7]
    assert set(item) == {"tokens", "labels", "loss_mask", "middle_mask"}
    assert [item[k].shape for k in item] == [(L,)] * 4
    assert (item["tokens"].dtype, item["labels"].dtype) == (torch.int64, torch.int64)
    assert (item["loss_mask"].dtype, item["middle_mask"].dtype) == (torch.float32, torch.bool)
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert bool(item["loss_mask"].eq(1).all()) and not bool(item["middle_mask"].any())
    assert torch.equal(ds[-1]["tokens"], ds[49]["tokens"])
    opened_itself = GPTDataset(ds.spec)  # no reader given: it opens megafim's IndexedDataset
    assert torch.equal(opened_itself[7]["labels"], item["labels"])
    with pytest.raises(IndexError):
        ds[50]


def test_samples_are_stream_slices_over_several_epochs(numbered):
    prefix, docs = numbered
    ds = make(prefix, num_samples=200)  # ~1400 tokens per epoch: several epochs
    assert ds.num_epochs > 2
    stream = stream_of(ds, docs)
    T = sum(len(d) for d in docs)
    seen = set()
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        ctx = ds.context(i)
        np.testing.assert_array_equal(ctx, stream[j * L:j * L + L + 1])
        assert ds.epoch_of(i) == j * L // T
        seen.add(j)
    assert len(seen) == len(ds)  # no sample twice
    assert [ds.epoch_of(i) for i in range(len(ds))] == sorted(ds.epoch_of(i) for i in range(len(ds)))


def test_same_seed_same_samples_other_seed_differs(numbered):
    a, b, c = make(numbered[0], num_samples=40), make(numbered[0], num_samples=40), \
        make(numbered[0], num_samples=40, seed=6)
    same = all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(40))
    differ = any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(40))
    assert same and differ


def test_splits_partition_documents(numbered):
    prefix, docs = numbered
    ranges = split_document_ranges(len(docs), "8,1,1")
    assert ranges[0][0] == 0 and ranges[-1][1] == len(docs)
    assert all(ranges[k][1] == ranges[k + 1][0] for k in range(2))
    cfg = DataConfig(data_paths=(prefix,), split="8,1,1", seq_length=L, seed=1)
    out = build_datasets(cfg, (100, 10, 10), open_indexed=open_dataset)
    used = []
    for name, (first, last) in zip(("train", "valid", "test"), ranges):
        ds = out[name]
        epoch_docs = set(int(d) for d in ds.doc_order[:last - first])
        assert epoch_docs == set(range(first, last))  # one epoch is exactly the split's documents
        for i in range(len(ds)):  # every token read comes from the split's documents
            assert set((ds.context(i) // 1000).tolist()) <= epoch_docs
        used.append(epoch_docs)
    assert set().union(*used) == set(range(len(docs))) and sum(map(len, used)) == len(docs)


def test_dataloader_workers_give_index_access_samples(numbered, tmp_path):
    for cache_dir in (None, str(tmp_path)):
        ds = make(numbered[0], num_samples=24, cache_dir=cache_dir)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
        got = torch.cat([batch["tokens"] for batch in loader])
        want = torch.stack([ds[i]["tokens"] for i in range(len(ds))])
        assert torch.equal(got, want)


def test_bad_ranges_and_config_errors(numbered):
    with pytest.raises(ValueError, match="beyond"):
        make(numbered[0], doc_range=(0, 61))
    with pytest.raises(ValueError, match=r"documents \[5, 6\) of .* hold no tokens"):
        make(numbered[0], doc_range=(5, 6))  # document 5 is empty
    with pytest.raises(ValueError, match="first < last"):
        GPTDatasetSpec(path_prefix="x", seq_length=4, seed=0, doc_range=(3, 3))
    with pytest.raises(ValueError, match="weights"):
        DataConfig(data_paths=("a", "b"), weights=(1.0,))
    with pytest.raises(ValueError, match="split"):
        DataConfig(data_paths=("a",), split="98,x")
    with pytest.raises(ValueError, match="seq_length"):
        DataConfig(data_paths=("a",), seq_length=0)
    with pytest.raises(FileNotFoundError, match="missing.idx"):
        build_datasets(DataConfig(data_paths=("missing",)), (1, 1, 1))
    with pytest.raises(ValueError, match="FimConfig"):
        DataConfig(data_paths=("a",), fim={"rate": 0.5})
    with pytest.raises(ValueError, match="tokenizer"):
        build_datasets(DataConfig(data_paths=(numbered[0],), fim=FimConfig()), (1, 1, 1))


def test_megatron_style_data_path():
    cfg = DataConfig.from_megatron_args(["0.3", "a", "0.7", "b"], split="90,5,5")
    assert cfg.data_paths == ("a", "b") and cfg.weights == (0.3, 0.7)
    assert DataConfig.from_megatron_args(["a", "b"]).weights is None
    with pytest.raises(ValueError, match="pairs"):
        DataConfig.from_megatron_args(["0.3", "a", "0.7"])


# ---- FIM composed into the dataset (a real tokenizer, trained once per session) ---------------
from tests.data.test_tokenizer_fixtures import small_model, small_tokenizer, stdlib_files, train_tool  # noqa: E402,F401


@pytest.fixture(scope="module")
def code_dataset(small_tokenizer, tmp_path_factory):
    """40 stdlib files, each encoded and ended with end-of-text, as Megatron's --append-eod does."""
    tok = small_tokenizer
    docs = [np.array(tok.encode(p.read_text(encoding="utf-8")) + [tok.eod])
            for p in stdlib_files(limit=40, step=37)]
    return write_dataset(tmp_path_factory.mktemp("code") / "code", docs, dtype=np.uint16)


def test_fim_is_applied_to_the_context_by_seed_epoch_index(code_dataset, small_tokenizer):
    from megafim.data.fim import FimTransform

    fim = FimTransform(FimConfig(rate=0.9, spm_rate=0.5), small_tokenizer)
    spec = GPTDatasetSpec(path_prefix=code_dataset, seq_length=128, seed=11, num_samples=40)
    ds = GPTDataset(spec, open_dataset(code_dataset), fim=fim)
    plain = GPTDataset(spec, open_dataset(code_dataset))
    middles = 0
    for i in range(len(ds)):
        item, ctx = ds[i], plain.context(i)
        want = fim(ctx, seed=ds.fim_seed, epoch=ds.epoch_of(i), index=i)
        assert torch.equal(item["tokens"], torch.as_tensor(want.tokens[:-1], dtype=torch.int64))
        assert torch.equal(item["labels"], torch.as_tensor(want.tokens[1:], dtype=torch.int64))
        assert torch.equal(item["loss_mask"], torch.as_tensor(want.loss_mask[1:], dtype=torch.float32))
        assert torch.equal(item["middle_mask"], torch.as_tensor(want.middle_mask[1:]))
        middles += int(item["middle_mask"].sum())
    assert middles > 0
    # A fresh object (a resumed run) and two DataLoader workers give the same samples.
    again = GPTDataset(spec, open_dataset(code_dataset), fim=fim)
    loader = torch.utils.data.DataLoader(again, batch_size=5, num_workers=2)
    got = torch.cat([b["tokens"] for b in loader])
    assert torch.equal(got, torch.stack([ds[i]["tokens"] for i in range(len(ds))]))
    # Workers started with "spawn" get a pickled copy; any other FIM callable goes the generic way.
    copy = pickle.loads(pickle.dumps(ds))
    generic = GPTDataset(spec, open_dataset(code_dataset), fim=lambda c, **kw: fim(c, **kw))
    for i in range(len(ds)):
        for other in (copy[i], generic[i]):
            for key, value in ds[i].items():
                assert torch.equal(other[key], value), key
    # Other splits or datasets draw other FIM randomness for the same index.
    assert GPTDataset(replace(spec, split_name="valid"), open_dataset(code_dataset)).fim_seed != ds.fim_seed
