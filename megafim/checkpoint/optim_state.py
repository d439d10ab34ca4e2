"""The layout-free optimizer state (``optim/``): Adam's moments of every parameter, and its fp32 master
weight where the model's weights are of lower precision, under the whole model's names, stored as
the slices each tensor x pipeline rank holds (``sharded.py``, the scheme of ``model/``), and Adam's
step count. A run of any tp / pp / dp layout or ZeRO stage reads the regions its parameters hold.

    optim/<shard>.safetensors   "<parameter>.exp_avg", "<parameter>.exp_avg_sq" (and "<parameter>.fp32")
    optim/index.json            metadata: {"step": <Adam steps taken>}

DeepSpeed keeps the state in flat buffers partitioned over the data-parallel ranks, laid out by the
ZeRO stage and the dp size. ``deepspeed.utils.safe_get_full_optimizer_state`` and
``safe_set_full_optimizer_state`` (and ``safe_*_full_fp32_param``) map one parameter's state out of
and into them under ZeRO 1, 2, 3 and the bf16 optimizer (the get is a collective over the
data-parallel group); without ZeRO in fp32 the torch optimizer holds each parameter's state itself.
One parameter's state is in memory at a time, unless an asynchronous save copies the rank's
whole state to host memory for its writer thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.safetensors_stream import LazyState, TensorSource
from megafim.checkpoint.sharded import INDEX, ShardedState, write_shard
from megafim.checkpoint.writer import HostBuffers, host_copy

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32"
# Where DeepSpeed's ZeRO 1/2, its bf16 optimizer and ZeRO-3 keep the flat fp32 tensors Adam steps on.
_FLAT_FP32 = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat")


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer: inside DeepSpeed's ZeRO or bf16 wrapper, or the one DeepSpeed uses as is."""
    return getattr(optimizer, "optimizer", optimizer)


def _partitioned(param) -> bool:
    """DeepSpeed maps the parameter to a flat buffer (ZeRO-3: ``ds_id``; ZeRO 1/2, bf16: ``_hp_mapping``)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _local_shape(param) -> tuple[int, ...]:
    """The shape this tensor rank holds (under ZeRO-3 the parameter itself is an empty placeholder)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _keys(param) -> tuple[str, ...]:
    # An fp32 parameter is its own master weight (``model/`` holds it exactly).
    return MOMENTS + ((MASTER,) if param.dtype != torch.float32 and _partitioned(param) else ())


def _tp_split(param, dims) -> bool:
    return dims.tp > 1 and getattr(param, "tensor_model_parallel", False)


def tp_region(param, dims) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, global shape) of this tensor rank's part of ``param``: a slice along ``partition_dim``
    for a tensor-parallel parameter, the whole tensor for a replicated one."""
    shape = list(_local_shape(param))
    offset = [0] * len(shape)
    if _tp_split(param, dims):
        offset[param.partition_dim] = dims.tp_rank * shape[param.partition_dim]
        shape[param.partition_dim] *= dims.tp
    return tuple(offset), tuple(shape)


def _get(optimizer, param, key: str, host: Callable[[torch.Tensor], torch.Tensor] | None = None
         ) -> torch.Tensor:
    """The parameter's whole ``key`` state (fp32, this tensor rank's shape). ``host``: return a copy
    in host memory that later steps do not change, made by ``host`` from a tensor the optimizer holds
    (a gathered one is a new buffer already, only moved off the device)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    held = _held_whole(param, key)
    if held is None and not _partitioned(param):
        held = base_optimizer(optimizer).state[param][key]
    if held is not None:
        # Converted before the host copy: the copy may be filled later (``writer.HostBuffers``), and a
        # tensor of another dtype made from it now would read the buffer before it is filled.
        out = held.detach().reshape(_local_shape(param)).to(torch.float32)
        return host(out) if host else out
    value = safe_get_full_fp32_param(param) if key == MASTER else safe_get_full_optimizer_state(param, key)
    return value.detach().reshape(_local_shape(param)).to("cpu" if host else value.device, torch.float32)


def _held_whole(param, key: str) -> torch.Tensor | None:
    """The view of ``param``'s ``key`` state in DeepSpeed's flat buffer when this rank holds all of it
    (ZeRO 1/2 or the bf16 optimizer over a data-parallel group of one rank): no gather is needed, and
    DeepSpeed's getter would allocate, zero and fill a buffer for what is already there."""
    import torch.distributed as dist

    mapping, group = getattr(param, "_hp_mapping", None), getattr(param, "_dp_group", None)
    if mapping is None or group is None or dist.get_world_size(group) != 1:
        return None
    fragment = mapping.get_hp_fragment(None if key == MASTER else key)
    return fragment if fragment.numel() == param.numel() else None


def _set(optimizer, param, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if key == MASTER:
        safe_set_full_fp32_param(param, value)
    elif _partitioned(param):
        safe_set_full_optimizer_state(param, value, key)
    else:
        target = base_optimizer(optimizer).state[param][key]
        target.copy_(value.reshape(target.shape))


def adam_step(optimizer) -> int | None:
    """Adam's step count (one for all parameters: they step together), None before the first step."""
    steps = {float(s["step"]) for s in base_optimizer(optimizer).state.values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"the optimizer's parameters have taken different numbers of steps: {sorted(steps)}")
    return int(steps.pop()) if steps else None


def save_optimizer_state(folder: Path, shard: str, optimizer, stage, dims, copy_to_host: bool = False,
                         memo: dict | None = None, buffers: HostBuffers | None = None
                         ) -> Callable[[], None] | None:
    """Collective over the data-parallel group: every rank calls it, in the same order; data-parallel
    rank 0 (of context rank 0) of each tensor x pipeline rank writes its slices. Replicated parameters
    are written by tensor rank 0. Returns None (writing nothing) before the optimizer's first step,
    else the writes still to do: none when the state was streamed into the file now (one parameter's
    state in memory at a time); with ``copy_to_host``, the gathers ran now into private host copies
    (the rank's whole state: the memory cost of an asynchronous save) and the returned function writes
    them, with no collective, so another thread may run it later. A tensor the optimizer holds is
    copied by ``writer.host_copy`` with the save's ``memo`` and ``buffers``: when DeepSpeed's own
    checkpoint already copied its storage, that copy is used."""
    if adam_step(optimizer) is None:
        return None
    _link(optimizer)
    writes = dims.dp_rank == 0 and getattr(dims, "cp_rank", 0) == 0
    memo = {} if memo is None else memo
    host = (lambda t: host_copy(t, memo, buffers)) if copy_to_host and writes else None
    sources, placement = {}, {}
    for name, param in stage.full_state_names().items():
        if not _tp_split(param, dims) and dims.tp_rank != 0:
            continue  # replicated: tensor rank 0 writes it
        offset, global_shape = tp_region(param, dims)
        for key in _keys(param):
            sources[f"{name}.{key}"] = TensorSource(_local_shape(param), torch.float32,
                                                    lambda p=param, k=key: _get(optimizer, p, k, host))
            placement[f"{name}.{key}"] = (offset, global_shape)
    state: Mapping[str, torch.Tensor] = LazyState(sources)
    if not writes:
        for name in state:  # take part in the gathers, in the writer's order
            state[name]
        return lambda: None
    if not copy_to_host:
        write_shard(folder, shard, state, placement)
        return lambda: None
    copies = {name: state[name] for name in state}
    return lambda: write_shard(folder, shard, copies, placement)


def _hp_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors the torch optimizer steps on: DeepSpeed's flat fp32 partitions, or the parameters."""
    for attr in _FLAT_FP32:
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    return [p for group in optimizer.param_groups for p in group["params"]]


def _materialize(optimizer) -> None:
    """Create a zero Adam state for every tensor the optimizer steps on, as torch's AdamW does at its
    first step (the step count on the CPU unless fused or capturable), and let DeepSpeed link each
    parameter's view of it (ZeRO 1/2 and the bf16 optimizer do that after their first step)."""
    base = base_optimizer(optimizer)
    on_device = bool(base.defaults.get("fused") or base.defaults.get("capturable"))
    for tensor in _hp_tensors(optimizer):
        if base.state.get(tensor):
            continue
        base.state[tensor] = {
            "step": torch.zeros((), dtype=torch.float32, device=tensor.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(tensor, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(tensor, memory_format=torch.preserve_format)}
    _link(optimizer)


def _link(optimizer) -> None:
    """(Re)build DeepSpeed's per-parameter views of the Adam state (ZeRO 1/2, the bf16 optimizer).

    DeepSpeed 0.19.8's ZeRO 1/2 build them once, right after stepping the first parameter group, when
    the other groups have no state yet: the parameters of the second group (norms, biases) then have
    no views and ``safe_get_full_optimizer_state`` raises "exp_avg not found". Linking again once every
    group has its state gives every parameter its views (they are views: nothing is copied)."""
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def load_optimizer_state(folder: Path, optimizer, stage, dims) -> int | None:
    """Set this rank's optimizer state from a checkpoint's ``optim/`` (any layout); not collective.
    Returns Adam's step count, or None when the checkpoint has no optimizer state (nothing is set)."""
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        return None
    saved = ShardedState(folder)
    step = saved.metadata.get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{folder / INDEX}: metadata.step is {step!r}, expected a step count")
    _materialize(optimizer)
    for name, param in stage.full_state_names().items():
        offset, global_shape = tp_region(param, dims)
        for key in _keys(param):
            stored = f"{name}.{key}"
            if stored not in saved:
                if key == MASTER:
                    continue  # saved in fp32: the weights in model/ are the master weights
                raise CheckpointError(f"{folder / INDEX}: no {stored} (a different model?)")
            if saved.spec(stored)[0] != global_shape:
                raise CheckpointError(f"{folder / INDEX}: {stored} has shape {list(saved.spec(stored)[0])}, "
                                      f"this model's is {list(global_shape)}")
            _set(optimizer, param, key, saved.read_slice(stored, offset, _local_shape(param)))
    for state in base_optimizer(optimizer).state.values():
        state["step"].fill_(step)
    return step
