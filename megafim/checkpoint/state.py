"""``trainer_state.json`` (the position in training and in the data), ``config.yaml`` and the RNG states."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from megafim.checkpoint.format import (CONFIG_YAML, FORMAT_VERSION, READABLE_VERSIONS, TRAINER_STATE,
                                       CheckpointError, rng_file)


@dataclass
class TrainerState:
    """What, besides the engine, a resume needs: the position in training and in the data."""

    step: int = 0
    """Optimizer steps completed."""
    consumed_samples: int = 0
    """Training samples consumed so far (global, across data-parallel ranks)."""
    epoch: int = 0
    """Passes over the training sample index completed."""
    nonfinite_in_a_row: int = 0
    """Consecutive skipped steps with a NaN/inf loss at save time."""
    layout: dict = field(default_factory=dict)
    """``{tensor, pipeline, data, zero_stage}`` of the run that saved."""
    format_version: int = FORMAT_VERSION
    """The checkpoint format (``megafim.checkpoint.format.FORMAT_VERSION``) it was written in."""


def write_trainer_state(ckpt_dir: Path, state: TrainerState, config_yaml: str) -> None:
    (Path(ckpt_dir) / TRAINER_STATE).write_text(json.dumps(state.__dict__, indent=2) + "\n")
    (Path(ckpt_dir) / CONFIG_YAML).write_text(config_yaml)


def read_trainer_state(ckpt_dir: Path) -> TrainerState:
    """The state of a checkpoint; ``CheckpointError`` naming the file when it is missing or malformed."""
    path = Path(ckpt_dir) / TRAINER_STATE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete megafim checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format_version {data.get('format_version')} is not one "
                              f"this megafim reads ({', '.join(map(str, READABLE_VERSIONS))})")
    known = {f.name for f in fields(TrainerState)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown fields {unknown}")
    try:
        return TrainerState(**data)
    except TypeError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def rng_state() -> dict:
    """Every RNG a training step can touch: python, numpy, torch CPU and (when present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(ckpt_dir: Path, rank: int) -> None:
    path = rng_file(ckpt_dir, rank)
    path.parent.mkdir(exist_ok=True)
    torch.save(rng_state(), path)


def load_rng(ckpt_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG states; ``False`` when the checkpoint has none for ``rank``."""
    path = rng_file(ckpt_dir, rank)
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True
