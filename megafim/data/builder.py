"""From a ``DataConfig`` to the train/valid/test datasets (single or blended), with their caches.

Distributed pattern (the caller owns the barrier)::

    rank0 = dist.get_rank() == 0
    if rank0:
        build_datasets(cfg, num_samples, tokenizer=tok, is_builder=True)   # writes the caches
    dist.barrier()
    datasets = build_datasets(cfg, num_samples, tokenizer=tok, is_builder=rank0)  # everyone maps them
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from megafim.data.blending import BlendedDataset, blending_indices, samples_per_dataset
from megafim.data.config import SPLIT_NAMES, DataConfig, split_document_ranges
from megafim.data.gpt_dataset import GPTDataset, GPTDatasetSpec, IndexedLike, tokens_in_range

logger = logging.getLogger(__name__)


def _open_indexed(prefix: str) -> IndexedLike:
    from megafim.data.indexed import IndexedDataset

    return IndexedDataset(prefix)


@dataclass
class _Build:
    """What every dataset of one call shares."""

    config: DataConfig
    fim: Callable[..., Any] | None
    is_builder: bool | Callable[[], bool]
    document_eod: int | None = None

    def gpt(self, prefix: str, indexed: IndexedLike, doc_range: tuple[int, int], num_samples: int | None,
            split_name: str) -> GPTDataset:
        c = self.config
        spec = GPTDatasetSpec(path_prefix=prefix, seq_length=c.seq_length, seed=c.seed,
                              num_samples=num_samples, doc_range=doc_range, split_name=split_name,
                              shuffle=c.shuffle, fingerprint=c.fingerprint)
        return GPTDataset(spec, indexed, fim=self.fim, cache_dir=c.cache_dir, is_builder=self.is_builder,
                          verify_cache=c.verify_cache, document_eod=self.document_eod)


def build_datasets(
    config: DataConfig,
    num_samples: Sequence[int | None],
    *,
    tokenizer: Any = None,
    is_builder: bool | Callable[[], bool] = True,
    open_indexed: Callable[[str], IndexedLike] | None = None,
    document_segments: bool = False,
) -> dict[str, torch.utils.data.Dataset | None]:
    """``{"train", "valid", "test"}`` -> dataset, or None for an empty split or 0 samples asked.

    ``num_samples``: samples per split (train, valid, test); None = one epoch of a single dataset.
    ``tokenizer``: needed when ``config.fim`` is set. ``open_indexed``: opens a prefix (default
    ``megafim.data.indexed.IndexedDataset``). ``document_segments``: samples carry the documents of
    their tokens (``GPTDataset``'s ``document_eod``, the tokenizer's end-of-text).
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must give (train, valid, test), got {num_samples!r}")
    config = config.check_files()  # also turns a .bin/.idx path into its prefix
    fim = None
    if config.fim is not None:
        if tokenizer is None:
            raise ValueError("DataConfig.fim is set, so build_datasets needs the tokenizer")
        from megafim.data.fim import FimTransform

        fim = FimTransform(config.fim, tokenizer)
    opener = open_indexed or _open_indexed
    indexed = [opener(p) for p in config.data_paths]
    ranges = [split_document_ranges(len(ds.document_indices) - 1, config.split) for ds in indexed]
    if document_segments and tokenizer is None:
        raise ValueError("build_datasets: document_segments needs the tokenizer (its end-of-text id)")
    build = _Build(config, fim, is_builder, tokenizer.eod if document_segments else None)
    out: dict[str, torch.utils.data.Dataset | None] = {}
    for s, name in enumerate(SPLIT_NAMES):
        n = num_samples[s]
        members = [d for d in range(len(indexed)) if ranges[d][s][1] > ranges[d][s][0]]
        if n == 0 or not members:
            out[name] = None
            continue
        if len(indexed) == 1:
            out[name] = build.gpt(config.data_paths[0], indexed[0], ranges[0][s], n, name)
            continue
        out[name] = _blend(build, indexed, [r[s] for r in ranges], members, n, name)
    return out


def _blend(build: _Build, indexed: list[IndexedLike], ranges: list[tuple[int, int]], members: list[int],
           size: int | None, split_name: str) -> BlendedDataset:
    c = build.config
    if size is None:
        raise ValueError(f"split {split_name!r} blends {len(indexed)} datasets: give its sample count")
    if len(members) < len(indexed):
        dropped = [c.data_paths[d] for d in range(len(indexed)) if d not in members]
        logger.warning("split %s: no documents in %s; blending the other datasets", split_name, dropped)
    if c.weights is not None:
        weights = [c.weights[d] for d in members]
    else:  # Megatron's default for unweighted paths: in proportion to their tokens
        weights = [tokens_in_range(indexed[d], ranges[d]) for d in members]
    dataset_index, dataset_sample_index = blending_indices(
        weights, size, cache_dir=c.cache_dir, is_builder=build.is_builder, verify_cache=c.verify_cache)
    counts = samples_per_dataset(dataset_index, len(members))
    datasets = [build.gpt(c.data_paths[d], indexed[d], ranges[d], count, split_name) if count else None
                for d, count in zip(members, counts)]
    return BlendedDataset(datasets, dataset_index, dataset_sample_index)
