"""Process groups, built once into a frozen dataclass and passed down (no module-level state).

Rank order: tensor-parallel fastest, then data-parallel, then pipeline:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so a tensor-parallel group is tp consecutive ranks (one node's fast links), and each pipeline stage is
a contiguous block of tp * dp ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


class ParallelSizeError(ValueError):
    """The parallel degrees do not fit the world (or each other); the message names the sizes."""


def coordinates(rank: int, tp: int, dp: int, pp: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def global_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def group_layout(tp: int, dp: int, pp: int) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks (a pure function; tested on its own).

    ``model`` groups hold the tp * pp ranks that together own one copy of the model (same dp_rank)."""
    tp_groups = [[global_rank(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[global_rank(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[global_rank(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    model_groups = [sorted(global_rank(t, d, p, tp, dp) for p in range(pp) for t in range(tp))
                    for d in range(dp)]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups, "model": model_groups}


def check_sizes(tp: int, pp: int, dp: int | None, world_size: int) -> int:
    """Validate the degrees against the world size; returns dp (derived when None)."""
    for name, value in (("tensor", tp), ("pipeline", pp)) + ((("data", dp),) if dp is not None else ()):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ParallelSizeError(f"parallel.{name} must be a positive integer, got {value!r}")
    if dp is None:
        if world_size % (tp * pp):
            raise ParallelSizeError(f"world size {world_size} is not divisible by tensor ({tp}) x "
                                    f"pipeline ({pp}) = {tp * pp}; the data-parallel degree would not "
                                    "be whole")
        return world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ParallelSizeError(f"tensor ({tp}) x pipeline ({pp}) x data ({dp}) = {tp * pp * dp} ranks, "
                                f"but the world size is {world_size}")
    return dp


@dataclass(frozen=True)
class ParallelDims:
    """The parallel degrees, this rank's coordinates and its process groups.

    A group is None only in a ParallelDims made without ``build`` (planning, tests); mappings read
    None as "no parallelism" (never as the default group)."""

    tp: int
    pp: int
    dp: int
    rank: int
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    model_group: dist.ProcessGroup | None = None
    """The tp * pp ranks that hold one model replica between them (DeepSpeed's "model parallel" group)."""

    def __post_init__(self) -> None:
        check_sizes(self.tp, self.pp, self.dp, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ParallelSizeError(f"rank {self.rank} is outside the world of {self.world_size} ranks")

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: int | None = None) -> "ParallelDims":
        """Check the sizes against the world (before any group work), then create every group.

        Needs ``torch.distributed`` initialised; without it the world size comes from WORLD_SIZE only
        to report bad sizes early. Every rank must call this (group creation is collective)."""
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        dp = check_sizes(tp, pp, dp, world)
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build: call torch.distributed.init_process_group first")
        rank = dist.get_rank()
        mine = {}
        for kind, groups in group_layout(tp, dp, pp).items():
            for ranks in groups:  # every rank creates every group, in the same order
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = group
        return cls(tp=tp, pp=pp, dp=dp, rank=rank, tp_group=mine["tp"], dp_group=mine["dp"],
                   pp_group=mine["pp"], model_group=mine["model"])

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return coordinates(self.rank, self.tp, self.dp, self.pp)[0]

    @property
    def dp_rank(self) -> int:
        return coordinates(self.rank, self.tp, self.dp, self.pp)[1]

    @property
    def pp_rank(self) -> int:
        return coordinates(self.rank, self.tp, self.dp, self.pp)[2]

    def ranks(self, kind: str) -> list[int]:
        """Global ranks of this rank's group of ``kind`` ("tp", "dp", "pp" or "model")."""
        return next(g for g in group_layout(self.tp, self.dp, self.pp)[kind] if self.rank in g)
