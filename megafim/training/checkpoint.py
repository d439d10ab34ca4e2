"""Atomic checkpoints: write to a temporary directory, fsync, rename, then move the ``latest`` pointer.

Layout of ``<save>/`` (docs/training.md):

    latest                    text file: the name of the newest complete checkpoint (``step_00000100``)
    step_00000100/            one complete checkpoint
        ds/                   DeepSpeed's engine state (model, ZeRO-partitioned optimizer)
        model/                layout-free weights: ``stage_<p>.safetensors`` (full tensors by name) + model_config.json
        trainer_state.json    step, consumed samples, epoch, layout (tp/pp/dp/zero), format version
        rng/rank_<r>.pt       python, numpy, torch (and cuda) RNG states of every rank
        config.yaml           the effective TrainConfig
        tokenizer.model       a copy of the tokenizer the run trained with
    .tmp-step_00000100/       a save in progress (never read; removed by the next save)

A kill at any point of a save leaves ``latest`` naming the previous complete checkpoint: the new one
only becomes visible through two atomic renames (the directory, then the pointer), each after fsync.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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
    """Bumped when the checkpoint layout changes."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(ckpt_dir: Path) -> int:
    """The step of a checkpoint directory named by ``step_dir_name``."""
    match = _STEP_DIR.match(Path(ckpt_dir).name)
    if match is None:
        raise ValueError(f"{ckpt_dir}: not a checkpoint directory (step_NNNNNNNN)")
    return int(match.group(1))


# --------------------------------------------------------------------------------------------
# Durable file-system primitives.


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (and ``path`` itself) so a rename is durable."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def temp_dir(save_root: Path, step: int) -> Path:
    return Path(save_root) / f".tmp-{step_dir_name(step)}"


def begin(save_root: Path, step: int) -> Path:
    """Create a fresh temporary directory for the save of ``step`` (rank 0 only) and return it."""
    save_root = Path(save_root)
    save_root.mkdir(parents=True, exist_ok=True)
    for stale in save_root.glob(".tmp-step_*"):  # left over by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(save_root, step)
    tmp.mkdir()
    return tmp


def commit(save_root: Path, step: int, keep_last: int) -> Path:
    """Make the save of ``step`` visible (rank 0 only, after every rank has written and synced).

    fsync the temporary directory, rename it to its final name, fsync the parent, then atomically
    point ``latest`` at it; finally prune to the last ``keep_last`` checkpoints (0 keeps all)."""
    save_root = Path(save_root)
    tmp, final = temp_dir(save_root, step), save_root / step_dir_name(step)
    fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. a signal right after an interval save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(save_root)
    write_text_atomic(save_root / "latest", final.name + "\n")
    prune(save_root, keep_last)
    return final


def list_checkpoints(save_root: Path) -> list[Path]:
    """Complete checkpoint directories under ``save_root``, oldest first."""
    root = Path(save_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def prune(save_root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; never the one ``latest`` names."""
    if keep_last <= 0:
        return
    latest = latest_checkpoint(save_root)
    for old in list_checkpoints(save_root)[:-keep_last]:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(load_root: Path) -> Path | None:
    """The checkpoint ``<load_root>/latest`` names, or ``None`` when there is none yet.

    ``load_root`` may also be a checkpoint directory itself (``.../step_00000100``)."""
    root = Path(load_root)
    if (root / "trainer_state.json").is_file():
        return root
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    if not _STEP_DIR.match(name) or not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a complete checkpoint in {root}")
    return path


# --------------------------------------------------------------------------------------------
# Trainer state and RNG states.


def write_trainer_state(ckpt_dir: Path, state: TrainerState, config_yaml: str) -> None:
    (Path(ckpt_dir) / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2) + "\n")
    (Path(ckpt_dir) / "config.yaml").write_text(config_yaml)


def read_trainer_state(ckpt_dir: Path) -> TrainerState:
    path = Path(ckpt_dir) / "trainer_state.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {data.get('format_version')} is not "
                         f"{FORMAT_VERSION}, the version this megafim reads")
    return TrainerState(**data)


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
    out = Path(ckpt_dir) / "rng"
    out.mkdir(exist_ok=True)
    torch.save(rng_state(), out / f"rank_{rank}.pt")


def load_rng(ckpt_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG states; ``False`` when the checkpoint has none for ``rank``."""
    path = Path(ckpt_dir) / "rng" / f"rank_{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True
