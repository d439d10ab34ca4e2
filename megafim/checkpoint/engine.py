"""Saving and loading a whole training state across ranks (collective; DeepSpeed and torch.distributed).

Two copies of the weights go into every checkpoint:
- ``ds/``: DeepSpeed's own files (model, ZeRO-partitioned optimizer) of every tp x pp rank, used for
  an exact resume on the same layout (tp, pp, dp, ZeRO stage);
- ``model/stage_<p>.safetensors``: the stage's parameters gathered to full (unsharded) tensors under
  the whole model's names, plus ``model/model_config.json`` (``megafim.checkpoint.weights``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megafim.checkpoint import files
from megafim.checkpoint.format import DS_DIR, MODEL_DIR, TOKENIZER_FILE, CheckpointError, step_dir_name, temp_dir
from megafim.checkpoint.state import TrainerState, save_rng, write_trainer_state
from megafim.checkpoint.weights import write_model_dir
from megafim.model.config import ModelConfig


def _gather_full(param: torch.Tensor, dims) -> torch.Tensor:
    """The full tensor of a tensor-parallel shard (concatenated along its ``partition_dim``)."""
    if dims.tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach().clone()
    parts = [torch.empty_like(param) for _ in range(dims.tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=dims.tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def full_stage_state(stage, dims, zero_stage: int) -> dict[str, torch.Tensor]:
    """This stage's parameters as full CPU tensors (collective over the tp and, for ZeRO-3, dp group)."""
    import deepspeed

    out = {}
    for name, param in stage.full_state_names().items():
        with deepspeed.zero.GatheredParameters([param], enabled=zero_stage == 3):
            out[name] = _gather_full(param, dims).cpu()
    return out


def save_model_state(ckpt_dir: Path, stage, dims, zero_stage: int, mc: ModelConfig) -> None:
    state = full_stage_state(stage, dims, zero_stage)  # every rank takes part in the gathers
    if dims.tp_rank == 0 and dims.dp_rank == 0:
        write_model_dir(Path(ckpt_dir) / MODEL_DIR, state, mc, pp_rank=dims.pp_rank)


def layout_of(dims, zero_stage: int) -> dict:
    return {"tensor": dims.tp, "pipeline": dims.pp, "data": dims.dp, "zero_stage": zero_stage}


def save(save_root: Path, engine, stage, dims, state: TrainerState, config_yaml: str, mc: ModelConfig,
         zero_stage: int, keep_last: int, tokenizer_model: str = "") -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint directory."""
    tmp = temp_dir(save_root, state.step)
    if dims.rank == 0:
        files.begin(save_root, state.step)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_DIR, save_latest=False)
    save_model_state(tmp, stage, dims, zero_stage, mc)
    save_rng(tmp, dims.rank)
    if dims.rank == 0:
        write_trainer_state(tmp, state, config_yaml)
        if tokenizer_model:  # a checkpoint is self-contained for evaluation, inference and export
            shutil.copyfile(tokenizer_model, tmp / TOKENIZER_FILE)
    dist.barrier()
    final = files.commit(save_root, state.step, keep_last) if dims.rank == 0 else None
    dist.barrier()
    return final or Path(save_root) / step_dir_name(state.step)


def load_engine_state(ckpt_dir: Path, engine) -> None:
    """Exact resume on the same layout: DeepSpeed restores weights, optimizer and its counters."""
    ds = Path(ckpt_dir) / DS_DIR
    if not ds.is_dir():
        raise CheckpointError(f"{ds}: missing (the checkpoint has no engine state for an exact resume)")
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_DIR, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{ds}: DeepSpeed found no checkpoint for this rank")


def name_checkpoint_files(engine, dims) -> None:
    """Give every (tensor, pipeline) rank its own DeepSpeed file names.

    DeepSpeed names its files by ``mpu.get_model_parallel_rank()``, which is the tensor rank (it must
    be: the gradient norm counts replicated parameters on model-parallel rank 0 of each stage), so two
    stages would write the same ``mp_rank_00_*`` files. The engine keeps the name index in
    ``checkpoint_mp_rank``; the index within the tp x pp model group is unique and matches the
    ``mp_world_size`` (tp x pp) that DeepSpeed checks the file count against on load."""
    engine.checkpoint_mp_rank = dims.tp_rank + dims.tp * dims.pp_rank
