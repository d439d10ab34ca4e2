"""The C++ index arrays (csrc/sample_index.cpp) against a slow pure-Python reference of the same
definitions, plus the properties the definitions promise."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megafim._native import load
from megafim.data.fim_reference import splitmix64
from megafim.data.gpt_dataset import build_gpt_index, plan_epochs

native = load("sample_index")
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


# ---- pure-Python reference ------------------------------------------------------------------
# SplitMix64's mixer: the FIM reference's, which test_fim_properties checks against published values.
ref_mix64 = splitmix64


def ref_stream_seed(seed, tag, epoch):
    return ref_mix64(ref_mix64(ref_mix64(seed) ^ tag) ^ epoch)


class RefRng:
    def __init__(self, seed):
        self.state = seed

    def next(self):
        z = self.state
        self.state = (self.state + GOLDEN) & M64
        return ref_mix64(z)

    def below(self, n):  # Lemire's multiply-and-reject
        m = self.next() * n
        if (m & M64) < n:
            threshold = ((1 << 64) - n) % n
            while (m & M64) < threshold:
                m = self.next() * n
        return m >> 64


def ref_partial_shuffle(a, r, rng):
    for k in range(min(r, len(a) - 1)):
        j = k + rng.below(len(a) - k)
        a[k], a[j] = a[j], a[k]


def ref_document_order(sizes, first, last, num_tokens, seed):
    """Whole shuffled epochs while they fit in num_tokens, then the next epoch's documents up to the
    one that completes num_tokens."""
    def epoch(e):
        docs = list(range(first, last))
        ref_partial_shuffle(docs, len(docs), RefRng(ref_stream_seed(seed, 1, e)))
        return docs

    T = int(sum(sizes[first:last]))
    full = num_tokens // T
    out = [d for e in range(full) for d in epoch(e)]
    tokens = full * T
    for d in epoch(full):
        if tokens >= num_tokens:
            break
        out.append(d)
        tokens += int(sizes[d])
    return out


def ref_sample_index(sizes, doc_order, seq_length, num_samples):
    """Locate stream token i*L by a cumulative sum: the first document whose end is past it."""
    ends = np.cumsum([sizes[d] for d in doc_order])
    rows = []
    for i in range(num_samples + 1):
        p = i * seq_length
        k = int(np.searchsorted(ends, p, side="right"))
        start = ends[k] - sizes[doc_order[k]]
        rows.append((k, p - start))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def ref_shuffle_samples(epoch_starts, num_out, seed):
    out = []
    for e in range(len(epoch_starts) - 1):
        a, b = int(epoch_starts[e]), int(epoch_starts[e + 1])
        if a >= num_out:
            break
        ids = list(range(a, b))
        r = min(b, num_out) - a
        ref_partial_shuffle(ids, r, RefRng(ref_stream_seed(seed, 2, e)))
        out += ids[:r]
    return out


def ref_blending(weights, size):
    count, di, dsi = [0] * len(weights), [], []
    for n in range(size):
        errors = [w * (n + 1) - c for w, c in zip(weights, count)]
        d = errors.index(max(errors))
        di.append(d)
        dsi.append(count[d])
        count[d] += 1
    return di, dsi


# ---- tests ----------------------------------------------------------------------------------
def test_rng_matches_reference():
    for seed in (0, 1, 2**63 - 1, 123456789):
        assert native.mix64(seed) == ref_mix64(seed)
        for tag, e in ((1, 0), (2, 7)):
            assert native.stream_seed(seed, tag, e) == ref_stream_seed(seed, tag, e)


@settings(max_examples=100, deadline=None)
@given(first=st.integers(0, 20), sizes=st.lists(st.integers(0, 9), min_size=1, max_size=60),
       num_tokens=st.integers(1, 800), seed=st.integers(0, 2**63 - 1))
def test_document_order_matches_reference(first, sizes, num_tokens, seed):
    sizes = np.array([1] * first + sizes, dtype=np.int32)
    last = len(sizes)
    if sizes[first:].sum() == 0:
        sizes[-1] = 1
    got = native.document_order(sizes, first, last, num_tokens, seed)
    assert got.dtype == np.int32
    assert got.tolist() == ref_document_order(sizes, first, last, num_tokens, seed)
    n = last - first
    for e in range(len(got) // n):  # each whole epoch is a permutation of the documents
        assert sorted(got[e * n:(e + 1) * n].tolist()) == list(range(first, last))
    assert sizes[got].sum() >= num_tokens


@pytest.mark.parametrize("num_out", [0, 1, 5, 60, 99, 100, 130, 250])
def test_shuffle_samples_matches_reference(num_out):
    """Covers whole epochs, a cut epoch kept mostly (scratch copy) and barely (lazy permutation)."""
    starts = np.array([0, 100, 100, 250], dtype=np.int64)
    got = native.shuffle_samples(starts, num_out, 99)
    assert got.tolist() == ref_shuffle_samples(starts, num_out, 99)
    big = native.shuffle_samples(np.array([0, 100000], dtype=np.int64), 40, 5, use_int64=True)
    assert big.dtype == np.int64
    assert big.tolist() == ref_shuffle_samples([0, 100000], 40, 5)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=25), seq_length=st.integers(1, 40),
       num_samples=st.integers(0, 30), seed=st.integers(0, 2**32))
def test_build_matches_reference(sizes, seq_length, num_samples, seed):
    sizes = np.array(sizes, dtype=np.int32)
    if sizes.sum() == 0:
        sizes[0] = 1
    n = len(sizes)
    got = build_gpt_index(sizes, (0, n), seq_length, num_samples, seed)
    plan = plan_epochs(int(sizes.sum()), seq_length, num_samples)
    order = ref_document_order(sizes, 0, n, plan.stream_tokens, seed)
    assert got["doc_order"].tolist() == order
    total = int(plan.epoch_starts[-1])
    assert total >= num_samples
    np.testing.assert_array_equal(got["sample_index"], ref_sample_index(sizes, order, seq_length, total))
    assert got["shuffle_index"].tolist() == ref_shuffle_samples(plan.epoch_starts, num_samples, seed)
    # Fewest epochs: one epoch less would not have held the samples.
    if plan.num_epochs > 1:
        assert ((plan.num_epochs - 1) * int(sizes.sum()) - 1) // seq_length < num_samples


def _stream(sizes, order):
    """Token ids as (document, offset) pairs, concatenated in document order."""
    return [(d, o) for d in order for o in range(sizes[d])]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 25), min_size=1, max_size=20), seq_length=st.integers(1, 30),
       num_samples=st.integers(1, 25), seed=st.integers(0, 1000))
def test_every_token_once_per_epoch_in_order(sizes, seq_length, num_samples, seed):
    sizes = np.array(sizes, dtype=np.int32)
    if sizes.sum() == 0:
        sizes[-1] = 3
    n, T, L = len(sizes), int(sizes.sum()), seq_length
    idx = build_gpt_index(sizes, (0, n), L, num_samples, seed)
    order, si = idx["doc_order"].tolist(), idx["sample_index"]
    stream = _stream(sizes, order)
    for e in range(len(order) // n):  # each epoch's stream is every token of every doc, in doc order
        assert sorted(stream[e * T:(e + 1) * T]) == sorted(_stream(sizes, range(n)))
    # Walking sample starts through the documents reproduces stream position i*L exactly.
    for i in range(len(si)):
        k, o = int(si[i, 0]), int(si[i, 1])
        assert stream[i * L] == (order[k], o)
    # The stream reaches the last sample's last token.
    S = len(si) - 1
    assert len(stream) >= S * L + 1
    # Shuffle: a permutation within each epoch, epochs in order.
    sh, starts = idx["shuffle_index"], idx["epoch_starts"]
    for e in range(len(starts) - 1):
        a, b = int(starts[e]), int(starts[e + 1])
        part = sh[a:min(b, len(sh))].tolist()
        assert set(part) <= set(range(a, b)) and len(set(part)) == len(part)
        if b <= len(sh):
            assert sorted(part) == list(range(a, b))
        assert all(i * L // T == e for i in part)  # each sample belongs to the epoch of its first token


def test_determinism_and_seed_sensitivity():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 100, size=500).astype(np.int32)
    a = build_gpt_index(sizes, (0, 500), 64, 2000, seed=7)
    b = build_gpt_index(sizes, (0, 500), 64, 2000, seed=7)
    c = build_gpt_index(sizes, (0, 500), 64, 2000, seed=8)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["doc_order"], c["doc_order"])
    assert not np.array_equal(a["shuffle_index"], c["shuffle_index"])


def test_more_samples_keep_the_prefix():
    """Asking for more samples later (a longer run) must not change the samples already seen."""
    sizes = np.random.default_rng(1).integers(1, 50, size=300).astype(np.int32)
    small = build_gpt_index(sizes, (0, 300), 32, 500, seed=3)
    big = build_gpt_index(sizes, (0, 300), 32, 1500, seed=3)
    n = len(small["shuffle_index"])
    np.testing.assert_array_equal(small["shuffle_index"], big["shuffle_index"][:n])
    np.testing.assert_array_equal(small["doc_order"], big["doc_order"][:len(small["doc_order"])])
    rows = small["sample_index"]
    np.testing.assert_array_equal(rows, big["sample_index"][:len(rows)])


def test_unshuffled_and_subrange():
    sizes = np.array([3, 4, 5, 6, 7], dtype=np.int32)
    idx = build_gpt_index(sizes, (1, 4), 4, None, seed=0, shuffle=False)
    # Documents 1..3 hold 4 + 5 + 6 = 15 tokens: one epoch owns the ceil(15 / 4) = 4 samples that
    # start at stream tokens 0, 4, 8, 12; the last one ends on token 16, in the next epoch's head.
    assert idx["doc_order"].tolist() == [1, 2, 3, 1]
    assert idx["shuffle_index"].tolist() == [0, 1, 2, 3]
    assert idx["sample_index"].tolist() == [[0, 0], [1, 0], [1, 4], [2, 3], [3, 1]]
    assert idx["epoch_starts"].tolist() == [0, 4]


def test_blending_matches_reference_and_is_within_one_sample():
    rng = np.random.default_rng(2)
    for _ in range(30):
        k = int(rng.integers(1, 7))
        w = rng.dirichlet(np.ones(k) * rng.choice([0.2, 1.0, 5.0]))
        di, dsi = native.blending_index(w, 400)
        ref_di, ref_dsi = ref_blending(w.tolist(), 400)
        assert di.tolist() == ref_di and dsi.tolist() == ref_dsi
        counts = np.zeros(k)
        for n, d in enumerate(di):
            counts[d] += 1
            assert np.abs(counts - w * (n + 1)).max() < 1.0


def test_native_argument_errors():
    with pytest.raises(ValueError, match="first < last"):
        native.document_order(np.ones(9, np.int32), 5, 5, 1, 0)
    with pytest.raises(ValueError, match="no tokens"):
        native.document_order(np.zeros(9, np.int32), 0, 9, 1, 0)
    with pytest.raises(ValueError, match="fewer tokens"):
        native.sample_index(np.array([3], np.int32), np.array([0], np.int32), 4, 1)
    with pytest.raises(ValueError, match="out of range"):
        native.sample_index(np.array([3], np.int32), np.array([2], np.int32), 1, 1)
    with pytest.raises(ValueError, match="num_out"):
        native.shuffle_samples(np.array([0, 3], np.int64), 4, 0)
    with pytest.raises(ValueError, match="no tokens"):
        plan_epochs(0, 10, None)


def _megatron_helpers():
    """megatron-core's compiled helpers, loaded directly (importing megatron itself takes seconds)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted((Path(list(spec.submodule_search_locations)[0]) / "core" / "datasets").glob("helpers_cpp*.so"))
    if not found:
        return None
    loader = importlib.util.spec_from_file_location("helpers_cpp", found[0])
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def test_rows_equal_megatron_build_sample_idx():
    """Same packing as Megatron-LM: on the same document order, the same (position, offset) rows."""
    helpers = _megatron_helpers()
    if helpers is None:
        pytest.skip("megatron-core (dev dependency) is not installed")
    rng = np.random.default_rng(4)
    for seq_length in (1, 7, 64):
        sizes = rng.integers(0, 40, size=200).astype(np.int32)
        T = int(sizes.sum())
        epochs = 3
        order = np.concatenate([rng.permutation(200) for _ in range(epochs + 1)]).astype(np.int32)
        theirs = helpers.build_sample_idx_int32(sizes, order[:200 * epochs], seq_length, epochs, T, True, 1)
        ours = native.sample_index(sizes, order, seq_length, len(theirs) - 1)
        np.testing.assert_array_equal(ours, theirs)


def test_int64_paths_give_the_same_values():
    """Arrays switch to int64 when ids or positions pass 2**31 - 1; the values must not change."""
    sizes = np.random.default_rng(5).integers(0, 30, size=300).astype(np.int32)
    sizes[0] = 1
    order32 = native.document_order(sizes, 3, 300, 20000, 9)
    order64 = native.document_order(sizes, 3, 300, 20000, 9, use_int64=True)
    assert (order32.dtype, order64.dtype) == (np.int32, np.int64)
    np.testing.assert_array_equal(order32, order64)
    rows32 = native.sample_index(sizes, order32, 13, 1000)
    rows64 = native.sample_index(sizes, order64, 13, 1000, use_int64=True)
    assert rows64.dtype == np.int64
    np.testing.assert_array_equal(rows32, rows64)
    starts = np.array([0, 400, 900, 1000], dtype=np.int64)
    np.testing.assert_array_equal(native.shuffle_samples(starts, 950, 2),
                                  native.shuffle_samples(starts, 950, 2, use_int64=True))
