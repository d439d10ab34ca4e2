"""Which samples each data-parallel rank reads, as a pure function of the consumed-sample count.

The dataset's own sample index is already shuffled (per epoch, from the seed), so the sampler walks it
in order, Megatron-style: global micro-batch g covers samples ``[g*M*D, (g+1)*M*D)`` (M micro batch,
D data-parallel size) and rank r takes ``M`` consecutive ones from ``r*M``. A resume only needs the
number of samples consumed; the position wraps into the next epoch at the end of the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class ResumableSampler:
    """Yields this rank's sample indices for successive micro-batches, from ``consumed_samples``."""

    n_samples: int
    """Samples in one epoch of the dataset."""
    micro_batch_size: int
    """Samples per rank per micro-batch."""
    dp_rank: int
    """This rank's index in its data-parallel group."""
    dp_size: int
    """Data-parallel group size."""
    consumed_samples: int = 0
    """Global samples consumed before the first yielded micro-batch (the resume position)."""

    def __post_init__(self):
        if self.n_samples <= 0:
            raise ValueError("ResumableSampler: the training dataset is empty")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"ResumableSampler: dp_rank {self.dp_rank} outside [0, {self.dp_size})")

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def epoch(self, consumed: int | None = None) -> int:
        """Epoch the position ``consumed`` falls in (passes over the dataset completed)."""
        return (self.consumed_samples if consumed is None else consumed) // self.n_samples

    def __iter__(self) -> Iterator[list[int]]:
        position = self.consumed_samples
        while True:
            start = position + self.dp_rank * self.micro_batch_size
            yield [(start + i) % self.n_samples for i in range(self.micro_batch_size)]
            position += self.global_micro_batch


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts (``tokens``, ``labels``, ``loss_mask``, ...) into batch tensors."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


class MicroBatches:
    """Iterator of collated micro-batches for this rank, resumable at ``consumed_samples``."""

    def __init__(self, dataset, sampler: ResumableSampler):
        self.dataset = dataset
        self.sampler = sampler
        self._indices = iter(sampler)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate([self.dataset[i] for i in next(self._indices)])
