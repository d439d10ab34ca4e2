"""Blending several datasets with weights, in exact proportions.

Blended sample n comes from the dataset whose count lags ``weight * (n + 1)`` the most (ties to the
lowest index), computed in C++ (``csrc/sample_index.cpp``). After any n samples every dataset has
contributed within one sample of ``weight * n``: the proportions are exact at every prefix, not
only on average, and each dataset is asked for exactly the samples the index uses.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from megafim._native import load as load_native
from megafim.data.index_cache import load_or_build

BLENDING_ALGORITHM_VERSION = 1


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blending weights {list(weights)} must be finite, >= 0 and not all 0")
    return w / w.sum()


def blending_indices(weights: Sequence[float], size: int, *, cache_dir: str | None = None,
                     is_builder: bool | Callable[[], bool] = True,
                     verify_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64), each of length ``size``."""
    w = normalize_weights(weights)
    if size < 0:
        raise ValueError(f"blended size must be >= 0, got {size}")
    native = load_native("sample_index")
    fields = {"kind": "blend", "algorithm": BLENDING_ALGORITHM_VERSION, "weights": w.tolist(),
              "size": int(size)}

    def build() -> dict[str, np.ndarray]:
        di, dsi = native.blending_index(w, int(size))
        return {"dataset_index": di, "dataset_sample_index": dsi}

    arrays = load_or_build(cache_dir, "blend", fields, build, is_builder, verify_cache).arrays
    return arrays["dataset_index"], arrays["dataset_sample_index"]


def samples_per_dataset(dataset_index: np.ndarray, num_datasets: int) -> list[int]:
    """How many samples the blend takes from each dataset (what each must be built with)."""
    return np.bincount(np.asarray(dataset_index, dtype=np.int64), minlength=num_datasets).tolist()


class BlendedDataset(torch.utils.data.Dataset):
    """Sample n is ``datasets[dataset_index[n]][dataset_sample_index[n]]``.

    A dataset the blend never uses may be None (a weight of 0, or too few samples to get one).
    """

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset | None], dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray) -> None:
        if len(dataset_index) != len(dataset_sample_index):
            raise ValueError("dataset_index and dataset_sample_index differ in length")
        self.datasets = list(datasets)
        self.dataset_index, self.dataset_sample_index = dataset_index, dataset_sample_index
        need = samples_per_dataset(dataset_index, len(self.datasets)) if len(dataset_index) else []
        if len(need) > len(self.datasets):
            raise ValueError(f"the blending index names dataset {len(need) - 1}, but only "
                             f"{len(self.datasets)} datasets were given")
        for d, (ds, n) in enumerate(zip(self.datasets, need)):
            if n and (ds is None or len(ds) < n):
                have = 0 if ds is None else len(ds)
                raise ValueError(f"blended dataset {d} must hold at least {n} samples, it holds {have}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def locate(self, i: int) -> tuple[int, int]:
        """(which dataset, which of its samples) blended sample ``i`` is."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a blend of {n} samples")
        return int(self.dataset_index[i]), int(self.dataset_sample_index[i])

    def epoch_of(self, i: int) -> int:
        d, j = self.locate(int(i))
        return self.datasets[d].epoch_of(j)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d, j = self.locate(int(i))
        return self.datasets[d][j]


__all__ = ["BlendedDataset", "blending_indices", "normalize_weights", "samples_per_dataset"]
