"""Growing an imported model's vocabulary to its tokenizer's: ``tools/add_fim_tokens.py`` gives a
tokenizer new ids (the FIM tokens) that the model has no embedding rows for.

The new rows of the embedding and of an untied unembedding are the mean of the existing rows
(Hewitt 2021, "Initializing new word embeddings"): a new token's logit then starts at about the
average logit instead of at a random value that could dominate the softmax, and the existing rows are
untouched, so the model's outputs for the old tokens do not change. Lazy like the import: the
embedding is read when it is written.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megafim.checkpoint.safetensors_stream import LazyState, TensorSource, tensor_spec
from megafim.model.config import ModelConfig

VOCAB_MATRICES = ("embed_tokens.weight", "lm_head.weight")  # megafim names; a tied model has the first only


def grown_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (vocab, hidden) with rows appended up to ``rows``, each the mean of the old ones."""
    mean = weight.mean(dim=0, keepdim=True, dtype=torch.float32).to(weight.dtype)  # (1, hidden)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def grow_vocab(state: Mapping[str, torch.Tensor], config: ModelConfig,
               vocab_size: int) -> tuple[LazyState, ModelConfig]:
    """``state`` and ``config`` with ``vocab_size`` rows in the vocabulary matrices (ValueError when
    that is fewer than the model has: rows the model was trained with are never dropped)."""
    if vocab_size < config.vocab_size:
        raise ValueError(f"vocabulary of {vocab_size} rows: fewer than the model's {config.vocab_size}")
    sources = {}
    for name in state:
        shape, dtype = tensor_spec(state, name)
        if name in VOCAB_MATRICES:
            sources[name] = TensorSource((vocab_size, *shape[1:]), dtype,
                                         lambda n=name: grown_rows(state[n], vocab_size))
        else:
            sources[name] = TensorSource(shape, dtype, lambda n=name: state[n])
    return LazyState(sources), config.replace(vocab_size=vocab_size)
