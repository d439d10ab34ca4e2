"""GPT samples over one ``.bin/.idx`` dataset: packed contexts of ``seq_length + 1`` tokens.

The index (built in C++ by ``csrc/sample_index.cpp``, cached by ``index_cache``) has three arrays:

- ``doc_order``: for each epoch a shuffled permutation of the split's documents, concatenated (and
  the head of one more epoch, as far as the last sample reaches). The token stream is these
  documents back to back; epoch e is stream tokens [e*T, (e+1)*T), T = the split's tokens.
- ``sample_index`` (S + 1, 2): where sample i starts, as (position in doc_order, token offset).
  Sample i is stream tokens [i*L, i*L + L] inclusive (L = seq_length), so consecutive samples share
  one token (the last label of one is the first input of the next), as in Megatron-LM.
- ``shuffle_index``: dataset index -> sample id. Samples are shuffled within their epoch (the epoch of
  their first token) only, so epochs follow each other, no sample repeats before its epoch ends,
  and asking for more samples later keeps the earlier ones unchanged.

Everything depends only on the seed and the configuration, and FIM (when configured) is drawn from
(seed, epoch, dataset index): the same index gives the same sample in any worker, rank or resume.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from megafim._native import load as load_native
from megafim.data.index_cache import CacheEntry, dataset_fingerprint, load_or_build, read_cache

INDEX_ALGORITHM_VERSION = 1  # bump when the arrays' definition changes: old caches then go unused
_INT32_MAX = np.iinfo(np.int32).max


class IndexedLike(Protocol):
    """What the dataset needs from ``megafim.data.indexed.IndexedDataset`` (Megatron's has it too)."""

    sequence_lengths: np.ndarray
    document_indices: np.ndarray

    def __len__(self) -> int: ...
    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class GPTDatasetSpec:
    """Everything that determines one dataset's index arrays (and so its cache name)."""

    path_prefix: str
    seq_length: int
    seed: int
    num_samples: int | None = None
    """Samples wanted; None = as many as one epoch gives. More than one epoch holds repeats epochs."""
    doc_range: tuple[int, int] | None = None
    """Documents [first, last) of the dataset (a split); None = all of them."""
    split_name: str = "train"
    shuffle: bool = True
    fingerprint: str = "stat"

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"GPTDatasetSpec.seq_length must be >= 1, got {self.seq_length}")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"GPTDatasetSpec.num_samples must be >= 0 or None, got {self.num_samples}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"GPTDatasetSpec.seed must be in [0, 2**63), got {self.seed}")
        if self.doc_range is not None:
            first, last = self.doc_range
            if not 0 <= first < last:
                raise ValueError(f"GPTDatasetSpec.doc_range {self.doc_range} of {self.path_prefix} "
                                 "must satisfy 0 <= first < last (the split is empty?)")


@dataclass(frozen=True)
class EpochPlan:
    """How many epochs a request takes and which sample ids each epoch owns."""

    tokens_per_epoch: int
    seq_length: int
    num_epochs: int
    epoch_starts: np.ndarray  # (num_epochs + 1,) int64: epoch e owns sample ids [starts[e], starts[e+1])
    num_samples: int  # the dataset's length

    @property
    def stream_tokens(self) -> int:
        """Tokens the stream must hold: through the last token of the last sample of the last epoch."""
        return int(self.epoch_starts[-1]) * self.seq_length + 1


def plan_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> EpochPlan:
    """The fewest epochs whose samples number at least ``num_samples``.

    A sample belongs to the epoch of its first token: epoch e owns the samples starting at stream
    tokens [e*T, (e+1)*T), i.e. sample ids [ceil(e*T/L), ceil((e+1)*T/L)). The last sample of an epoch
    may end in the next epoch's documents; those are then read from the next epoch's order. This
    keeps every epoch's sample set (and shuffle) independent of how many epochs are asked for.
    """
    if tokens_per_epoch < 1:
        raise ValueError("the dataset (split) holds no tokens")
    T, L = tokens_per_epoch, seq_length
    if num_samples is None:  # exactly one epoch
        num_epochs = 1
        num_samples = -(-T // L)
    else:  # smallest E with ceil(E*T/L) >= num_samples, i.e. E*T > (num_samples - 1)*L
        num_epochs = max(1, (max(num_samples, 1) - 1) * L // T + 1)
    starts = [-(-e * T // L) for e in range(num_epochs + 1)]
    return EpochPlan(T, L, num_epochs, np.asarray(starts, dtype=np.int64), num_samples)


def build_gpt_index(sizes: np.ndarray, seq_range: tuple[int, int], seq_length: int,
                    num_samples: int | None, seed: int, shuffle: bool = True) -> dict[str, np.ndarray]:
    """Build the index arrays of sequences [seq_range) with lengths ``sizes`` (the C++ fast path)."""
    native = load_native("sample_index")
    first, last = seq_range
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    plan = plan_epochs(int(sizes[first:last].sum(dtype=np.int64)), seq_length, num_samples)
    doc_order = native.document_order(sizes, first, last, plan.stream_tokens, seed, shuffle,
                                      last > _INT32_MAX)
    total = int(plan.epoch_starts[-1])
    sample_index = native.sample_index(sizes, doc_order, seq_length, total, len(doc_order) > _INT32_MAX)
    shuffle_index = native.shuffle_samples(plan.epoch_starts, plan.num_samples, seed, shuffle,
                                           total > _INT32_MAX)
    return {"doc_order": doc_order, "sample_index": sample_index, "shuffle_index": shuffle_index,
            "epoch_starts": plan.epoch_starts}


def _fim_seed(seed: int, split_name: str, path_prefix: str) -> int:
    """A FIM seed per (seed, split, dataset name), so blended datasets and splits draw independently."""
    native = load_native("sample_index")
    name = path_prefix.rstrip("/").rsplit("/", 1)[-1]
    salt = zlib.crc32(f"{split_name}/{name}".encode())
    return native.stream_seed(seed, 3, salt) & (2**63 - 1)


def _fast_fim_entry(fim: Any) -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """``FimTransform.sample`` when ``fim`` is a FimTransform (the same samples as calling it, less
    Python per sample), else None: other callables are called as documented."""
    from megafim.data.fim import FimTransform

    return fim.sample if isinstance(fim, FimTransform) else None


def document_segments(context: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """The document of every input token and of every label of a (FIM'd) context of L + 1 tokens.

    A document ends with its end-of-text token, so a FIM piece (sentinels, suffix, prefix, middle,
    end-of-text) stays one document. Returns (segment_ids of context[:-1], segment_ids of
    context[1:]), int32, counted from 0: a label opens a new document right after an end-of-text."""
    after_eod = np.zeros(len(context), dtype=np.int32)
    np.cumsum(context[:-1] == eod, out=after_eod[1:])
    return after_eod[:-1], after_eod[1:]


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{"tokens", "labels", "loss_mask", "middle_mask"}`` of length ``seq_length``.

    ``indexed``: an open dataset (default: ``megafim.data.indexed.IndexedDataset(spec.path_prefix)``).
    ``fim``: a callable ``(context, *, seed, epoch, index) -> FimResult`` (``FimTransform``) or None.
    ``cache_dir`` / ``is_builder``: see ``index_cache.load_or_build`` (build on rank 0, the caller
    barriers, the others load).
    ``document_eod``: the end-of-text id; when given, samples also carry ``segment_ids`` and
    ``label_segment_ids`` (``document_segments`` of the context after FIM), for intra-document
    attention (``megafim.model.documents``).
    """

    def __init__(self, spec: GPTDatasetSpec, indexed: IndexedLike | None = None, *,
                 fim: Callable[..., Any] | None = None, cache_dir: str | None = None,
                 is_builder: bool | Callable[[], bool] = True, verify_cache: bool = True,
                 document_eod: int | None = None) -> None:
        if indexed is None:
            from megafim.data.indexed import IndexedDataset

            indexed = IndexedDataset(spec.path_prefix)
        self.spec, self.indexed, self.fim = spec, indexed, fim
        self.document_eod = document_eod
        self._fim_sample = _fast_fim_entry(fim)
        self.fim_seed = _fim_seed(spec.seed, spec.split_name, spec.path_prefix)
        doc_idx = np.asarray(indexed.document_indices)
        first, last = spec.doc_range if spec.doc_range is not None else (0, len(doc_idx) - 1)
        if last > len(doc_idx) - 1:
            raise ValueError(f"doc_range {spec.doc_range} is beyond the {len(doc_idx) - 1} documents "
                             f"of {spec.path_prefix}")
        self.seq_range = (int(doc_idx[first]), int(doc_idx[last]))  # documents -> sequences
        if not np.asarray(indexed.sequence_lengths[self.seq_range[0]:self.seq_range[1]]).any():
            raise ValueError(f"documents [{first}, {last}) of {spec.path_prefix} hold no tokens")
        fields = {"kind": "gpt", "algorithm": INDEX_ALGORITHM_VERSION, **asdict(spec),
                  "dataset": dataset_fingerprint(spec.path_prefix, spec.fingerprint)
                  if cache_dir is not None else spec.path_prefix,
                  "seq_range": list(self.seq_range)}
        # The fingerprint names the data; the split name only seeds FIM, not the index arrays.
        fields.pop("split_name")
        fields.pop("path_prefix")
        entry = load_or_build(
            cache_dir, "gpt", fields,
            lambda: build_gpt_index(indexed.sequence_lengths, self.seq_range, spec.seq_length,
                                    spec.num_samples, spec.seed, spec.shuffle),
            is_builder, verify_cache)
        self._set_arrays(entry)

    def _set_arrays(self, entry: CacheEntry) -> None:
        self._entry = entry
        a = entry.arrays
        self.doc_order, self.sample_index = a["doc_order"], a["sample_index"]
        self.shuffle_index, self.epoch_starts = a["shuffle_index"], a["epoch_starts"]
        # A few epochs at most: bisect on a list costs ~0.1 us, numpy's searchsorted ~2 us per sample.
        self._epoch_starts_list = [int(x) for x in self.epoch_starts]

    # Workers get the cache file's path, not a copy of its arrays, and map it again.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._entry.path is not None:
            for name in ("_entry", "doc_order", "sample_index", "shuffle_index", "epoch_starts", "_epoch_starts_list"):
                state.pop(name)
            state["_cache_ref"] = (self._entry.path, self._entry.key)
        state.pop("_fim_sample")  # a native bound method: taken from the unpickled fim again
        return state

    def __setstate__(self, state: dict) -> None:
        ref = state.pop("_cache_ref", None)
        self.__dict__.update(state)
        self._fim_sample = _fast_fim_entry(self.fim)
        if ref is not None:
            path, key = ref
            self._set_arrays(CacheEntry(read_cache(path, key, verify_data=False), path, key))

    @property
    def num_epochs(self) -> int:
        return len(self.epoch_starts) - 1

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a dataset of {n} samples")
        return i + n if i < 0 else i

    def epoch_of(self, i: int) -> int:
        """The epoch of sample ``i`` (the epoch of its first token)."""
        i = self._check_index(int(i))
        return bisect.bisect_right(self._epoch_starts_list, i) - 1

    def context(self, i: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``i`` before FIM (int64)."""
        return self._stored_context(self._check_index(int(i))).astype(np.int64, copy=False)

    def _stored_context(self, i: int) -> np.ndarray:
        """``context(i)`` in the dataset's own dtype; ``i`` already checked."""
        j = int(self.shuffle_index[i])
        (k0, o0), (k1, o1) = self.sample_index[j], self.sample_index[j + 1]
        k0, o0, k1, o1 = int(k0), int(o0), int(k1), int(o1)
        get, order = self.indexed.get, self.doc_order
        if k0 == k1:
            parts = [get(int(order[k0]), o0, o1 - o0 + 1)]
        else:
            parts = [get(int(order[k0]), o0)]
            parts += [get(int(order[k])) for k in range(k0 + 1, k1)]
            parts.append(get(int(order[k1]), 0, o1 + 1))
        ctx = np.concatenate(parts)
        if len(ctx) != self.spec.seq_length + 1:  # the index and the .idx disagree: never pad silently
            raise RuntimeError(f"sample {i} of {self.spec.path_prefix} read {len(ctx)} tokens, expected "
                               f"{self.spec.seq_length + 1}: stale index cache or changed dataset?")
        return ctx

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._check_index(int(i))
        ctx = self._stored_context(i)
        if self.fim is None:
            ctx = ctx.astype(np.int64, copy=False)
            loss_mask = np.ones(len(ctx), dtype=np.float32)
            middle_mask = np.zeros(len(ctx), dtype=bool)
        elif self._fim_sample is not None:
            # FimTransform, the hot path: one native call on the stored tokens (no int64 copy first),
            # new int64/float32/bool arrays back; bisect is epoch_of without checking i again.
            ctx, loss_mask, middle_mask = self._fim_sample(
                ctx, self.fim_seed, bisect.bisect_right(self._epoch_starts_list, i) - 1, i)
        else:
            ctx = ctx.astype(np.int64, copy=False)
            out = self.fim(ctx, seed=self.fim_seed, epoch=self.epoch_of(i), index=i)
            ctx = np.asarray(out.tokens, dtype=np.int64)
            loss_mask = np.asarray(out.loss_mask, dtype=np.float32)
            middle_mask = np.asarray(out.middle_mask, dtype=bool)
        # Masks are per context token (is it a target?); labels are ctx[1:], so they align with [1:].
        sample = {
            "tokens": torch.from_numpy(np.ascontiguousarray(ctx[:-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(ctx[1:])),
            "loss_mask": torch.from_numpy(np.ascontiguousarray(loss_mask[1:])),
            "middle_mask": torch.from_numpy(np.ascontiguousarray(middle_mask[1:])),
        }
        if self.document_eod is not None:
            segments, label_segments = document_segments(ctx, self.document_eod)
            sample["segment_ids"] = torch.from_numpy(segments)
            sample["label_segment_ids"] = torch.from_numpy(label_segments)
        return sample


def tokens_in_range(indexed: IndexedLike, doc_range: tuple[int, int]) -> int:
    """Tokens of documents [first, last) (used to weight unweighted blends by size)."""
    doc_idx = np.asarray(indexed.document_indices)
    s0, s1 = int(doc_idx[doc_range[0]]), int(doc_idx[doc_range[1]])
    return int(np.asarray(indexed.sequence_lengths)[s0:s1].sum(dtype=np.int64))


__all__ = ["GPTDataset", "GPTDatasetSpec", "document_segments", "EpochPlan", "plan_epochs", "build_gpt_index",
           "tokens_in_range", "INDEX_ALGORITHM_VERSION"]
