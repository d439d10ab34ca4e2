"""Process groups, built once into a frozen dataclass and passed down (no module-level state).

Rank order: tensor-parallel fastest, then context-parallel, then data-parallel, then pipeline:

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

so a tensor-parallel group is tp consecutive ranks (one node's fast links), the context-parallel ranks
that all-gather keys and values every layer come next, and each pipeline stage is a contiguous block
of tp * cp * dp ranks. Context-parallel ranks hold the same weights and read the same samples (each a
part of their sequences), so gradients are reduced over data- and context-parallel ranks together:
the ``dp_cp`` group, which DeepSpeed sees as its data-parallel group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


class ParallelSizeError(ValueError):
    """The parallel degrees do not fit the world (or each other); the message names the sizes."""


def coordinates(rank: int, tp: int, dp: int, pp: int, cp: int = 1) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank (``context_rank`` gives the cp coordinate)."""
    return rank % tp, (rank // (tp * cp)) % dp, rank // (tp * cp * dp)


def context_rank(rank: int, tp: int, cp: int) -> int:
    """The context-parallel coordinate of a global rank."""
    return (rank // tp) % cp


def global_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int, cp_rank: int = 0,
                cp: int = 1) -> int:
    return tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))


def group_layout(tp: int, dp: int, pp: int, cp: int = 1) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks (a pure function; tested on its own).

    ``model`` groups hold the tp * pp ranks that together own one copy of the model (same dp and cp
    rank); ``dp_cp`` the dp * cp ranks that hold the same shard of the weights."""
    def g(t, d, p, c):
        return global_rank(t, d, p, tp, dp, c, cp)

    every = [(t, d, p, c) for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp)]

    def groups(key) -> list[list[int]]:  # ranks that agree on key(coordinates), in rank order
        out: dict = {}
        for coords in every:
            out.setdefault(key(*coords), []).append(g(*coords))
        return [sorted(ranks) for ranks in out.values()]

    return {"tp": groups(lambda t, d, p, c: (p, d, c)), "dp": groups(lambda t, d, p, c: (p, t, c)),
            "pp": [[g(t, d, p, c) for p in range(pp)] for d in range(dp) for c in range(cp) for t in range(tp)],
            "model": groups(lambda t, d, p, c: (d, c)), "cp": groups(lambda t, d, p, c: (p, d, t)),
            "dp_cp": groups(lambda t, d, p, c: (p, t))}


def check_sizes(tp: int, pp: int, dp: int | None, world_size: int, cp: int = 1) -> int:
    """Validate the degrees against the world size; returns dp (derived when None)."""
    for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp)) + \
            ((("data", dp),) if dp is not None else ()):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ParallelSizeError(f"parallel.{name} must be a positive integer, got {value!r}")
    if dp is None:
        if world_size % (tp * pp * cp):
            raise ParallelSizeError(f"world size {world_size} is not divisible by tensor ({tp}) x "
                                    f"pipeline ({pp}) x context ({cp}) = {tp * pp * cp}; the data-parallel "
                                    "degree would not be whole")
        return world_size // (tp * pp * cp)
    if tp * pp * cp * dp != world_size:
        raise ParallelSizeError(f"tensor ({tp}) x pipeline ({pp}) x context ({cp}) x data ({dp}) = "
                                f"{tp * pp * cp * dp} ranks, but the world size is {world_size}")
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
    cp: int = 1
    """Context-parallel degree: ranks that split each sample's sequence."""
    cp_group: dist.ProcessGroup | None = None
    dp_cp_group: dist.ProcessGroup | None = None
    """Data- and context-parallel ranks together: where gradients are averaged (DeepSpeed's dp group)."""

    def __post_init__(self) -> None:
        check_sizes(self.tp, self.pp, self.dp, self.world_size, self.cp)
        if not 0 <= self.rank < self.world_size:
            raise ParallelSizeError(f"rank {self.rank} is outside the world of {self.world_size} ranks")

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: int | None = None, cp: int = 1) -> "ParallelDims":
        """Check the sizes against the world (before any group work), then create every group.

        Needs ``torch.distributed`` initialised; without it the world size comes from WORLD_SIZE only
        to report bad sizes early. Every rank must call this (group creation is collective)."""
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        dp = check_sizes(tp, pp, dp, world, cp)
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build: call torch.distributed.init_process_group first")
        rank = dist.get_rank()
        mine = {}
        for kind, groups in group_layout(tp, dp, pp, cp).items():
            for ranks in groups:  # every rank creates every group, in the same order
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = group
        return cls(tp=tp, pp=pp, dp=dp, rank=rank, tp_group=mine["tp"], dp_group=mine["dp"],
                   pp_group=mine["pp"], model_group=mine["model"], cp=cp, cp_group=mine["cp"],
                   dp_cp_group=mine["dp_cp"])

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def tp_rank(self) -> int:
        return coordinates(self.rank, self.tp, self.dp, self.pp, self.cp)[0]

    @property
    def dp_rank(self) -> int:
        return coordinates(self.rank, self.tp, self.dp, self.pp, self.cp)[1]

    @property
    def pp_rank(self) -> int:
        return coordinates(self.rank, self.tp, self.dp, self.pp, self.cp)[2]

    @property
    def cp_rank(self) -> int:
        return context_rank(self.rank, self.tp, self.cp)

    def ranks(self, kind: str) -> list[int]:
        """Global ranks of this rank's group of ``kind`` ("tp", "dp", "pp", "model", "cp", "dp_cp")."""
        return next(g for g in group_layout(self.tp, self.dp, self.pp, self.cp)[kind] if self.rank in g)
