"""Process-group start-up and shut-down for the trainer (torchrun environment variables).

Runs after the config is validated. On the CPU it keeps DeepSpeed from JIT-building its shared-memory
communication op (~40 s per fresh machine, docs/platform_notes.md): gloo does the collectives instead.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits, from torchrun's environment (or a single process without it)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "WorldInfo":
        return cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def pick_backend(requested: str) -> str:
    if requested != "auto":
        if requested == "nccl" and not torch.cuda.is_available():
            raise ValueError("parallel.backend = nccl needs CUDA; use gloo (or auto) on the CPU")
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(info: WorldInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _disable_shm_comm_op() -> None:
    """Tell DeepSpeed its shared-memory CPU comm op is unavailable, so it never compiles it.

    ``deepspeed.ops.__compatible_ops__`` is DeepSpeed's own table of usable ops, which its CPU comm
    backend consults before building; DeepSpeed documents that edits to the cached table persist."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def rendezvous_store(info: WorldInfo, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store the ranks meet in, private to this start of the job.

    Under torchrun the agent's TCP store outlives a restart (``--max-restarts``: torch shares one store
    across rendezvous rounds), so the keys the previous attempt wrote are still there: each rank's gloo
    address, the counters of the store-based barriers that ``init_process_group`` and ``new_group``
    run. Ranks of the restarted attempt then read a dead rank's address, or a counter that has already
    reached its target, and wait for peers that will never come. Prefixing every key with the restart
    count gives each attempt an empty namespace."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, info.world_size, is_master=not agent_hosts_it and info.rank == 0,
                          timeout=timeout)
    return dist.PrefixStore(f"megafim/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(info: WorldInfo, backend: str, timeout_min: float = 10.0) -> torch.device:
    """Create the default process group (also for one rank, so the code path is the same) and
    DeepSpeed's communication backend on top of it. Returns this rank's device.

    ``timeout_min`` bounds both the wait for the other ranks to start and every collective: a rank
    whose peers died fails after it instead of hanging (the launcher then restarts the job)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    device = device_for(info)
    backend = pick_backend(backend)
    if not torch.cuda.is_available():
        _disable_shm_comm_op()
    # A plain `python -m megafim.train` is a world of one; DeepSpeed insists on torchrun's variables.
    for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank)):
        os.environ.setdefault(key, str(value))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        timeout = datetime.timedelta(minutes=timeout_min)
        dist.init_process_group(backend=backend, store=rendezvous_store(info, timeout), rank=info.rank,
                                world_size=info.world_size, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Barrier, then destroy the group: exiting without it aborts ~1 run in 10 (docs/platform_notes.md)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
