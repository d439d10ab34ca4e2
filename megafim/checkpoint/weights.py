"""The layout-free weights of a checkpoint (``model/``): the whole model's parameters by name, each
stored as the slices the tensor x pipeline ranks held (``sharded.py``: ``tp<t>_pp<p>.safetensors`` and
``index.json``), and ``model_config.json``.

Any tensor-, pipeline- or data-parallel layout, inference and the converters read them the same way,
one tensor at a time (``read_model_state`` is lazy), so none of them holds a second copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml

from megafim.checkpoint import files, manifest
from megafim.checkpoint.format import (CONFIG_YAML, LATEST, MODEL_CONFIG, MODEL_DIR, TOKENIZER_FILE,
                                       CheckpointError, is_step_dir_name)
from megafim.checkpoint.safetensors_stream import LazySafetensors
from megafim.checkpoint.sharded import INDEX, ShardedState, merge_index, write_shard
from megafim.checkpoint.state import TrainerState, write_trainer_state
from megafim.checkpoint.verified_read import readers_for
from megafim.model.config import ModelConfig


def shard_name(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:02d}_pp{pp_rank:02d}"


def read_model_config(ckpt_dir: Path) -> ModelConfig:
    path = Path(ckpt_dir) / MODEL_DIR / MODEL_CONFIG
    try:
        return ModelConfig(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete megafim checkpoint)") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid model config ({exc})") from None


def read_model_state(ckpt_dir: Path, checksums: dict | None = None, hasher=None,
                     algorithm: str = manifest.ALGORITHM) -> tuple[Mapping[str, torch.Tensor], ModelConfig]:
    """Full model state {name: tensor} and its ModelConfig from a checkpoint's ``model/`` folder.

    The tensors are read from the files when accessed, one at a time, each assembled from the slices
    the ranks wrote (``sharded.py``); format 1 kept whole tensors in ``stage_<p>.safetensors``.
    ``checksums`` (the manifest's ``files``, of its ``algorithm``): the shards' checksums are computed
    as their bytes are read (``verified_read.py``; in the ``hasher`` executor's one thread when given),
    and the state's ``finish()`` compares them."""
    folder = Path(ckpt_dir) / MODEL_DIR
    config = read_model_config(ckpt_dir)
    if (folder / INDEX).is_file():
        return ShardedState(folder, readers_for(folder, Path(ckpt_dir), checksums, hasher, algorithm)), config
    files = sorted(folder.glob("stage_*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no {INDEX} (not a complete megafim checkpoint)")
    return LazySafetensors(files), config


def full_weights(ckpt_dir: Path) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """``weights(name, full_shape)`` for ``training.build.build_stage``: the layout-free weights of a
    checkpoint, read one tensor at a time (to reshard a run saved with another layout), each checked by
    name and shape when it is read."""
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


def write_model_config(model_dir: Path, config: ModelConfig) -> None:
    (Path(model_dir) / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def write_model_dir(model_dir: Path, state: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    """Write a whole model's layout-free weights as one shard, streamed: a lazy ``state`` (a
    converter's) is read and written one tensor at a time."""
    write_shard(model_dir, shard_name(0, 0), state)
    merge_index(model_dir)
    write_model_config(model_dir, config)


def _data_section(ckpt: Path) -> dict:
    """The ``data:`` section of the checkpoint's ``config.yaml`` ({} without one)."""
    config_yaml = Path(ckpt) / CONFIG_YAML
    if not config_yaml.is_file():
        return {}
    try:
        data = yaml.safe_load(config_yaml.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{config_yaml}: not valid YAML ({exc})") from None
    return data.get("data") or {}


def tokenizer_path(ckpt: Path) -> str | None:
    """The checkpoint's own ``tokenizer.model``, else the one its ``config.yaml`` names, else None."""
    ckpt = Path(ckpt)
    if (ckpt / TOKENIZER_FILE).is_file():
        return str(ckpt / TOKENIZER_FILE)
    return _data_section(ckpt).get("tokenizer_model") or None


def special_tokens(ckpt: Path) -> dict[str, str]:
    """The spellings of end-of-text / FIM tokens the checkpoint's run named (``data.special_tokens`` of
    its ``config.yaml``), so that whatever reads the checkpoint finds the same tokens without being
    told again; {} when the run named none (the tokenizer's known spellings then apply)."""
    named = _data_section(ckpt).get("special_tokens") or {}
    if not isinstance(named, dict) or not all(isinstance(v, str) for v in named.values()):
        raise CheckpointError(f"{Path(ckpt) / CONFIG_YAML}: data.special_tokens is not a mapping of names "
                              f"to spellings ({named!r})")
    return dict(named)


def document_settings(ckpt: Path) -> dict[str, bool]:
    """``data.reset_attention_mask`` and ``data.reset_position_ids`` of the checkpoint's run (False when
    its ``config.yaml`` has none), so that an evaluation scores documents as training saw them."""
    data = _data_section(ckpt)
    out = {}
    for name in ("reset_attention_mask", "reset_position_ids"):
        value = data.get(name, False)
        if not isinstance(value, bool):
            raise CheckpointError(f"{Path(ckpt) / CONFIG_YAML}: data.{name} is not true or false ({value!r})")
        out[name] = value
    return out


def write_weights_checkpoint(save_root: Path, state: Mapping[str, torch.Tensor], config: ModelConfig,
                             config_yaml: str, tokenizer_model: str | None = None, step: int = 0) -> Path:
    """A complete checkpoint holding only layout-free weights (no optimizer state), e.g. a Hugging Face
    model imported by ``tools/convert_hf_to_checkpoint.py``; a run loads it as a checkpoint of another
    layout. ``save_root`` must not hold checkpoints already: the new one would become ``latest`` and
    the next ``--load`` of that directory would restart the run from it."""
    save_root = Path(save_root)
    existing = sorted(p.name for p in save_root.iterdir()
                      if p.name == LATEST or is_step_dir_name(p.name)) if save_root.is_dir() else []
    if existing:
        raise CheckpointError(f"{save_root}: already holds a run ({', '.join(existing[:3])}); choose an "
                              "empty or new directory")
    tokenizer = files.tokenizer_source(tokenizer_model) if tokenizer_model else None  # checked first
    tmp = files.begin(save_root, step)
    write_model_dir(tmp / MODEL_DIR, state, config)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    write_trainer_state(tmp, TrainerState(step=step), config_yaml)
    return files.commit(save_root, step, keep_last=0)
