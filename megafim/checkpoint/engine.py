"""Saving and loading a whole training state across ranks (collective; DeepSpeed and torch.distributed).

Two copies of the weights go into every checkpoint:
- ``ds/``: DeepSpeed's own files (model, ZeRO-partitioned optimizer) of every tp x pp rank, used for
  an exact resume on the same layout (tp, pp, dp, ZeRO stage);
- ``model/``: every tensor x pipeline rank's slices of its parameters under the whole model's names and
  an index of which slice each file holds (``sharded.py``), plus ``model_config.json``: a layout-free
  view that any layout reads one global tensor at a time, written without gathering anything;
- ``optim/``: the optimizer state in the same scheme (``optim_state.py``), for a resume in another layout.

With a background ``writer.Writer`` (``--async-save``) ``save`` returns once it knows what to copy: every
tensor of the state has a host buffer, and the writer thread copies the bytes into them while the next
step's forward and backward run, then writes and commits the files (``writer.py``). The optimizer step
is the first thing that changes those tensors, and it waits for the copy (``Writer.guard``); a second
save and the end of training wait for the whole write. Under ZeRO-3 the copy is made in ``save``:
DeepSpeed frees and re-gathers the parameters' memory in every forward. ``optim/``'s gathers are
collectives, which the writer thread must not run: they run in the loop, into new tensors that the
writer thread writes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from megafim.checkpoint import files, optim_state
from megafim.checkpoint.format import (DS_DIR, MODEL_DIR, OPTIM_DIR, TOKENIZER_FILE, CheckpointError,
                                       step_dir_name, temp_dir)
from megafim.checkpoint.state import TrainerState, save_rng, write_trainer_state
from megafim.checkpoint.sharded import merge_index, write_shard
from megafim.checkpoint.weights import shard_name, write_model_config
from megafim.checkpoint.writer import (COPY_DELAY_ENV, DeferredSaves, HostBuffers, Writer, host_copy,
                                       mark_done, wait_for_ranks, write_delay)
from megafim.model.config import ModelConfig


def stage_slices(stage, dims, zero_stage: int) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's slices of its stage's parameters ({name: tensor}, {name: (offset, global shape)}).

    Tensor-parallel parameters are this rank's slice along ``partition_dim``; replicated ones are
    written by tensor rank 0 only. The tensors are the parameters themselves (no copy), except under
    ZeRO-3, where each is gathered over the data-parallel group (collective) and copied, one at a time."""
    import deepspeed

    state, placement = {}, {}
    for name, param in stage.full_state_names().items():
        sharded = dims.tp > 1 and getattr(param, "tensor_model_parallel", False)
        if not sharded and dims.tp_rank != 0 and zero_stage != 3:
            continue
        with deepspeed.zero.GatheredParameters([param], enabled=zero_stage == 3):
            tensor = param.detach().clone() if zero_stage == 3 else param.detach()
        if not sharded and dims.tp_rank != 0:
            continue
        shape, offset = list(tensor.shape), [0] * tensor.dim()
        if sharded:
            offset[param.partition_dim] = dims.tp_rank * tensor.shape[param.partition_dim]
            shape[param.partition_dim] *= dims.tp
        state[name], placement[name] = tensor, (tuple(offset), tuple(shape))
    return state, placement


def save_model_state(ckpt_dir: Path, stage, dims, zero_stage: int, mc: ModelConfig,
                     copy_to_host: bool = False, memo: dict | None = None,
                     buffers: HostBuffers | None = None) -> Callable[[], None]:
    """Every rank calls it (collective under ZeRO-3); returns the writes of this rank's part of
    ``model/`` (data-parallel rank 0 of each tensor x pipeline rank writes its slices; the others
    nothing). ``copy_to_host``: the slices are copied now, so that the writes may run later; with the
    ``memo`` of the save's other copies a parameter DeepSpeed's model state already holds is not
    copied again (``writer.host_copy``)."""
    state, placement = stage_slices(stage, dims, zero_stage)
    if dims.dp_rank != 0 or getattr(dims, "cp_rank", 0) != 0:  # context-parallel ranks hold the same weights
        return lambda: None
    state = host_copy(state, memo, buffers) if copy_to_host else state

    def write() -> None:
        write_shard(Path(ckpt_dir) / MODEL_DIR, shard_name(dims.tp_rank, dims.pp_rank), state, placement)
        if dims.rank == 0:
            write_model_config(Path(ckpt_dir) / MODEL_DIR, mc)
    return write


def layout_of(dims, zero_stage: int) -> dict:
    layout = {"tensor": dims.tp, "pipeline": dims.pp, "data": dims.dp, "zero_stage": zero_stage}
    if getattr(dims, "cp", 1) > 1:  # ZeRO partitions over data x context ranks; absent at 1: older layouts equal
        layout["context"] = dims.cp
    return layout


def save(save_root: Path, engine, stage, dims, state: TrainerState, config_yaml: str, mc: ModelConfig,
         zero_stage: int, keep_last: int, tokenizer_model: str = "", writer: Writer | None = None,
         timeout_s: float = 600.0, say: Callable[[str], None] = print) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory it commits.

    With a background ``writer`` it returns once every tensor to copy has a host buffer; the copy and
    the files are made by the writer's thread (the optimizer's next step waits for the copy), and
    rank 0's commits (manifest, rename, ``latest``; then ``say``) once every rank has marked its files
    complete, waiting at most ``timeout_s``. Without one (or a synchronous one) it returns after the
    commit."""
    writer = writer or Writer(background=False)
    writer.wait()  # a second save waits for the first (and raises its error)
    step = state.step  # the writer thread commits this step while the loop moves ``state`` on
    tmp = temp_dir(save_root, step)
    if dims.rank == 0:
        files.begin(save_root, step)
    dist.barrier()
    deferred_copy = writer.background and zero_stage != 3
    if deferred_copy:
        writer.guard(optim_state.base_optimizer(engine.optimizer))
    memo = writer.buffers.start(deferred_copy)  # one memo: each storage copied once, into last save's buffer
    deferred = DeferredSaves(engine, memo, writer.buffers) if writer.background else nullcontext()
    with deferred:  # DeepSpeed's files: written now, or kept in host memory for the writer
        engine.save_checkpoint(str(tmp), tag=DS_DIR, save_latest=False)
    write_model = save_model_state(tmp, stage, dims, zero_stage, mc, writer.background, memo, writer.buffers)
    write_optim = optim_state.save_optimizer_state(tmp / OPTIM_DIR, shard_name(dims.tp_rank, dims.pp_rank),
                                                   engine.optimizer, stage, dims, writer.background, memo,
                                                   writer.buffers) or (lambda: None)
    writer.buffers.finish()
    del memo
    optim_step = optim_state.adam_step(engine.optimizer)
    save_rng(tmp, dims.rank)
    if dims.rank == 0:
        write_trainer_state(tmp, state, config_yaml)
        if tokenizer_model:  # a checkpoint is self-contained for evaluation, inference and export
            shutil.copyfile(files.tokenizer_source(tokenizer_model), tmp / TOKENIZER_FILE)
    final = Path(save_root) / step_dir_name(step)

    def merge_indexes() -> None:
        merge_index(tmp / MODEL_DIR)
        if (tmp / OPTIM_DIR).is_dir():  # absent before the optimizer's first step
            merge_index(tmp / OPTIM_DIR, {"step": optim_step})

    def write_files() -> None:
        time.sleep(write_delay(step))
        if writer.background:
            deferred.write_all()
        write_model()
        write_optim()

    if not writer.background:
        write_files()
        dist.barrier()
        if dims.rank == 0:
            merge_indexes()
            files.commit(save_root, step, keep_last)
        dist.barrier()
        return final

    started = {}

    def copy() -> None:
        started["copy"] = time.perf_counter()
        time.sleep(write_delay(step, COPY_DELAY_ENV))
        try:
            writer.buffers.copy_pending()
        except BaseException as exc:
            mark_done(tmp, dims.rank, exc)
            raise

    def write_and_commit() -> None:
        try:
            write_files()
        except BaseException as exc:
            mark_done(tmp, dims.rank, exc)
            raise
        mark_done(tmp, dims.rank)
        if dims.rank == 0:
            wait_for_ranks(tmp, dims.world_size, timeout_s)
            merge_indexes()
            files.commit(save_root, step, keep_last)
            say(f"checkpoint: {final} complete (copied and written in the background in "
                f"{time.perf_counter() - started['copy']:.1f} s)")
    writer.start(write_and_commit, copy)
    return final


def load_engine_state(ckpt_dir: Path, engine) -> None:
    """Exact resume on the same layout: DeepSpeed restores weights, optimizer and its counters."""
    ds = Path(ckpt_dir) / DS_DIR
    if not ds.is_dir():
        raise CheckpointError(f"{ds}: missing (the checkpoint has no engine state for an exact resume)")
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_DIR, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{ds}: DeepSpeed found no checkpoint for this rank")


def load_resharded_state(ckpt_dir: Path, engine, stage, dims, step: int, consumed_samples: int) -> int | None:
    """Resume in another layout (the weights came from ``model/``): set the optimizer state from
    ``optim/`` and DeepSpeed's step counters. Returns Adam's step count, None when the checkpoint has
    no optimizer state (the optimizer then starts fresh)."""
    adam_steps = optim_state.load_optimizer_state(Path(ckpt_dir) / OPTIM_DIR, engine.optimizer, stage, dims)
    engine.global_steps, engine.global_samples = step, consumed_samples
    return adam_steps


def name_checkpoint_files(engine, dims) -> None:
    """Give every (tensor, pipeline) rank its own DeepSpeed file names.

    DeepSpeed names its files by ``mpu.get_model_parallel_rank()``, which is the tensor rank (it must
    be: the gradient norm counts replicated parameters on model-parallel rank 0 of each stage), so two
    stages would write the same ``mp_rank_00_*`` files. The engine keeps the name index in
    ``checkpoint_mp_rank``; the index within the tp x pp model group is unique and matches the
    ``mp_world_size`` (tp x pp) that DeepSpeed checks the file count against on load."""
    engine.checkpoint_mp_rank = dims.tp_rank + dims.tp * dims.pp_rank
