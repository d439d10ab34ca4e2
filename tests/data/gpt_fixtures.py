"""Small `.bin/.idx` datasets for the GPT dataset, blending and index-cache tests, written and read
with megafim's own indexed dataset (Megatron-LM's format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megafim.data.indexed import IndexedDataset, IndexedDatasetBuilder


def write_dataset(prefix: str | Path, documents: list[np.ndarray], dtype=np.uint16) -> str:
    """Write one sequence per document; returns the prefix as a string."""
    prefix = str(prefix)
    with IndexedDatasetBuilder(prefix, dtype=dtype) as builder:
        for doc in documents:
            builder.add_document(np.asarray(doc, dtype=np.int64))
    return prefix


def open_dataset(prefix: str | Path) -> IndexedDataset:
    return IndexedDataset(str(prefix))


def random_documents(rng: np.random.Generator, num_docs: int, max_len: int = 40, vocab: int = 1000,
                     empty_every: int = 0) -> list[np.ndarray]:
    """Documents of random lengths 1..max_len (every `empty_every`-th one empty when > 0)."""
    docs = []
    for d in range(num_docs):
        n = 0 if empty_every and d % empty_every == empty_every - 1 else int(rng.integers(1, max_len + 1))
        docs.append(rng.integers(0, vocab, size=n))
    return docs


def numbered_documents(lengths: list[int]) -> list[np.ndarray]:
    """Document d holds tokens d*1000, d*1000+1, ...: every token says where it came from."""
    return [np.arange(n, dtype=np.int64) + 1000 * d for d, n in enumerate(lengths)]
