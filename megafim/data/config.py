"""Typed configuration of the training data: which datasets, blended how, split how, cached where."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # fim.py is written beside this file; only its type is needed here
    from megafim.data.fim import FimConfig

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> tuple[float, float, float]:
    """``"98,1,1"`` -> normalised weights (0.98, 0.01, 0.01); missing trailing parts are 0."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    if not 1 <= len(parts) <= 3 or any(p == "" for p in parts):
        raise ValueError(f"split {split!r}: expected 1 to 3 comma-separated numbers, like '98,1,1'")
    try:
        values = [float(p) for p in parts]
    except ValueError as err:
        raise ValueError(f"split {split!r}: {err}") from err
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"split {split!r}: parts must be finite, >= 0, and not all 0")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def split_document_ranges(num_documents: int, split: str | Sequence[float]) -> list[tuple[int, int]]:
    """Cut ``num_documents`` into consecutive train/valid/test document ranges.

    Boundary i is ``round(cumulative weight i * num_documents)`` (half up), taken on the cumulative
    sum so the ranges always partition [0, num_documents) exactly, whatever the rounding does.
    """
    weights = parse_split(split) if isinstance(split, str) else tuple(split)
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    bounds, cumulative = [0], 0.0
    for w in weights[:-1]:
        cumulative += w
        bounds.append(min(num_documents, int(math.floor(cumulative * num_documents + 0.5))))
    bounds.append(num_documents)
    return [(bounds[i], bounds[i + 1]) for i in range(len(weights))]


def parse_data_paths(items: Sequence[str]) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """Megatron's ``--data-path``: ``PREFIX [PREFIX ...]`` or ``W1 PREFIX1 W2 PREFIX2 ...``."""
    items = list(items)
    if not items:
        raise ValueError("data path: at least one dataset prefix is required")

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    if not is_number(items[0]):
        return tuple(items), None
    if len(items) % 2:
        raise ValueError(f"data path {items}: weighted form needs pairs 'WEIGHT PREFIX'")
    weights, paths = items[0::2], items[1::2]
    for w in weights:
        if not is_number(w):
            raise ValueError(f"data path {items}: {w!r} is not a weight (weighted form is 'W PREFIX ...')")
    return tuple(paths), tuple(float(w) for w in weights)


@dataclass(frozen=True)
class DataConfig:
    """Everything that decides the training samples, apart from the tokenizer and the sample counts."""

    data_paths: tuple[str, ...]
    """Dataset prefixes: ``<prefix>.bin`` and ``<prefix>.idx`` must exist (``check_files`` also takes
    the ``.bin``/``.idx`` path and turns it into the prefix)."""
    weights: tuple[float, ...] | None = None
    """Blending weights, one per path (normalised); None = proportional to each dataset's tokens."""
    split: str = "98,1,1"
    """Train/valid/test weights over each dataset's documents (Megatron's ``--split``)."""
    seq_length: int = 2048
    """Tokens per sample seen by the model; each sample reads ``seq_length + 1`` tokens."""
    seed: int = 1234
    """Seeds the document order, the sample shuffle and the FIM draws."""
    cache_dir: str | None = None
    """Where index caches go; None = build in memory on every process (fine for small data)."""
    fingerprint: str = "stat"
    """How a dataset is identified in cache names: "stat" (path, size, mtime) or "content"."""
    verify_cache: bool = True
    """Check every cached array's CRC-32 on load (one read of the cache)."""
    fim: "FimConfig | None" = None
    """FIM transform settings; None trains left to right only."""
    shuffle: bool = True
    """Shuffle documents and samples (turn off only to look at data in file order)."""

    def __post_init__(self) -> None:
        if isinstance(self.data_paths, str):
            object.__setattr__(self, "data_paths", (self.data_paths,))
        object.__setattr__(self, "data_paths", tuple(str(p) for p in self.data_paths))
        if not self.data_paths:
            raise ValueError("DataConfig.data_paths: at least one dataset prefix is required")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.data_paths):
                raise ValueError(f"DataConfig.weights: {len(self.weights)} weights for "
                                 f"{len(self.data_paths)} data paths")
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"DataConfig.weights {self.weights}: must be finite, >= 0, not all 0")
        parse_split(self.split)  # raises with the field's value in the message
        if not isinstance(self.seq_length, int) or self.seq_length < 1:
            raise ValueError(f"DataConfig.seq_length must be a positive int, got {self.seq_length!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"DataConfig.seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.fim is not None:
            from megafim.data.fim import FimConfig

            if not isinstance(self.fim, FimConfig):
                raise ValueError(f"DataConfig.fim must be a FimConfig or None, got {type(self.fim).__name__}")
        if self.fingerprint not in ("stat", "content"):
            raise ValueError(f"DataConfig.fingerprint must be 'stat' or 'content', got {self.fingerprint!r}")

    @classmethod
    def from_megatron_args(cls, data_path: Sequence[str], **kwargs) -> "DataConfig":
        """Build from Megatron-style ``--data-path`` items (optionally weighted) and other fields."""
        paths, weights = parse_data_paths(data_path)
        return cls(data_paths=paths, weights=weights, **kwargs)

    @property
    def split_weights(self) -> tuple[float, float, float]:
        return parse_split(self.split)

    def check_files(self, what: str = "DataConfig.data_paths") -> "DataConfig":
        """Check that every dataset exists; returns this config with each path as its prefix.

        A path may be the prefix or its ``.bin``/``.idx`` file (``resolve_dataset_prefix``). A missing
        dataset raises ``FileNotFoundError`` naming ``what`` (the caller's flag or field) and the path,
        suggesting ``<path>_text_document`` when only that exists.
        """
        from megafim.data.indexed import resolve_dataset_prefix

        prefixes = tuple(resolve_dataset_prefix(p, what) for p in self.data_paths)
        return self if prefixes == self.data_paths else replace(self, data_paths=prefixes)
