"""Saving and loading a whole training state across ranks (the directory layout is in checkpoint.py).

Two copies of the weights go into every checkpoint:
- ``ds/``: DeepSpeed's own files (model, ZeRO-partitioned optimizer) of every tp x pp rank,
  used for an exact resume on the same layout (tp, pp, dp, ZeRO stage);
- ``model/stage_<p>.safetensors``: the stage's parameters gathered to full (unsharded) tensors under
  the whole model's names, plus ``model/model_config.json``. Together the files are one layout-free
  model state: a run with another layout builds its stage from them, one tensor at a time, slicing
  each for its tensor-parallel rank (the optimizer then starts fresh, which the log says), and
  converters read them without DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megafim.convert.streaming import LazySafetensors
from megafim.model import ModelConfig
from megafim.parallel import ParallelDims
from megafim.training import checkpoint as ck

MODEL_DIR, DS_DIR, TOKENIZER_FILE = "model", "ds", "tokenizer.model"


def _gather_full(param: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The full tensor of a tensor-parallel shard (concatenated along its ``partition_dim``)."""
    if dims.tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach().clone()
    parts = [torch.empty_like(param) for _ in range(dims.tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=dims.tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def full_stage_state(stage, dims: ParallelDims, zero_stage: int) -> dict[str, torch.Tensor]:
    """This stage's parameters as full CPU tensors (collective over the tp and, for ZeRO-3, dp group)."""
    import deepspeed

    named = stage.full_state_names()
    out = {}
    for name, param in named.items():
        with deepspeed.zero.GatheredParameters([param], enabled=zero_stage == 3):
            out[name] = _gather_full(param, dims).cpu()
    return out


def save_model_state(ckpt_dir: Path, stage, dims: ParallelDims, zero_stage: int, mc: ModelConfig) -> None:
    state = full_stage_state(stage, dims, zero_stage)  # every rank takes part in the gathers
    if dims.tp_rank == 0 and dims.dp_rank == 0:
        out = Path(ckpt_dir) / MODEL_DIR
        out.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"stage_{dims.pp_rank:02d}.safetensors"),
                  metadata={"format": "pt"})
        if dims.pp_rank == 0:
            (out / "model_config.json").write_text(json.dumps(dataclasses.asdict(mc), indent=2) + "\n")


def read_model_state(ckpt_dir: Path) -> tuple[Mapping[str, torch.Tensor], ModelConfig]:
    """Full model state {name: tensor} and its ModelConfig from a checkpoint's ``model/`` folder.

    The tensors are read from the files when accessed, one at a time, so a converter or a run that
    loads another layout's weights never holds a second copy of the whole model."""
    folder = Path(ckpt_dir) / MODEL_DIR
    files = sorted(folder.glob("stage_*.safetensors"))
    config = folder / "model_config.json"
    if not files or not config.is_file():
        raise FileNotFoundError(f"{folder}: no stage_*.safetensors or model_config.json (not a complete "
                                "megafim checkpoint)")
    return LazySafetensors(files), ModelConfig(**json.loads(config.read_text()))


def full_weights(ckpt_dir: Path) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """``weights(name, full_shape)`` for ``build.build_stage``: the layout-free weights of a checkpoint,
    read one tensor at a time (to reshard a run saved with another layout), each checked by name and
    shape when it is read."""
    state, _ = read_model_state(ckpt_dir)

    def weight(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in state:
            raise KeyError(f"{ckpt_dir}: the checkpoint has no weights for {name} "
                           "(a different model config?)")
        saved = state[name]
        if tuple(saved.shape) != tuple(shape):
            raise ValueError(f"{ckpt_dir}: {name} has shape {tuple(saved.shape)} in the checkpoint, "
                             f"{tuple(shape)} in this model (a different model config?)")
        return saved
    return weight


def layout_of(dims: ParallelDims, zero_stage: int) -> dict:
    return {"tensor": dims.tp, "pipeline": dims.pp, "data": dims.dp, "zero_stage": zero_stage}


def save(save_root: Path, engine, stage, dims: ParallelDims, state: ck.TrainerState, config_yaml: str,
         mc: ModelConfig, zero_stage: int, keep_last: int, tokenizer_model: str = "") -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint directory."""
    tmp = ck.temp_dir(save_root, state.step)
    if dims.rank == 0:
        ck.begin(save_root, state.step)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_DIR, save_latest=False)
    save_model_state(tmp, stage, dims, zero_stage, mc)
    ck.save_rng(tmp, dims.rank)
    if dims.rank == 0:
        ck.write_trainer_state(tmp, state, config_yaml)
        if tokenizer_model:  # a checkpoint is self-contained for evaluation, inference and export
            src = Path(tokenizer_model)  # a Hugging Face directory: its tokenizer.json (loaders sniff JSON)
            shutil.copyfile(src / "tokenizer.json" if src.is_dir() else src, tmp / TOKENIZER_FILE)
    dist.barrier()
    final = ck.commit(save_root, state.step, keep_last) if dims.rank == 0 else None
    dist.barrier()
    return final or Path(save_root) / ck.step_dir_name(state.step)


def load_engine_state(ckpt_dir: Path, engine, dims: ParallelDims) -> None:
    """Exact resume on the same layout: DeepSpeed restores weights, optimizer and its counters."""
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=DS_DIR, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir}/{DS_DIR}: DeepSpeed found no checkpoint for this rank")


def name_checkpoint_files(engine, dims: ParallelDims) -> None:
    """Give every (tensor, pipeline) rank its own DeepSpeed file names.

    DeepSpeed names its files by ``mpu.get_model_parallel_rank()``, which is the tensor rank (it must
    be: the gradient norm counts replicated parameters on model-parallel rank 0 of each stage), so two
    stages would write the same ``mp_rank_00_*`` files. The engine keeps the name index in
    ``checkpoint_mp_rank``; the index within the tp x pp model group is unique and matches the
    ``mp_world_size`` (tp x pp) that DeepSpeed checks the file count against on load."""
    engine.checkpoint_mp_rank = dims.tp_rank + dims.tp * dims.pp_rank
