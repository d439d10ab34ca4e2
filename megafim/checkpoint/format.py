"""Names and constants of the checkpoint format (docs/checkpoints.md describes the whole layout).

    <save>/latest                     the name of the newest complete checkpoint (``step_00000100``)
    <save>/step_00000100/             one complete checkpoint (files below)
    <save>/.tmp-step_00000100/        a save in progress: never read, removed by the next save
"""

from __future__ import annotations

import re
from pathlib import Path

FORMAT_VERSION = 2
"""1: no manifest. 2: ``manifest.json`` with a checksum per file (version 1 still loads, unverified)."""
READABLE_VERSIONS = (1, 2)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CONFIG_YAML = "config.yaml"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
MODEL_CONFIG = "model_config.json"
OPTIM_DIR = "optim"
DS_DIR = "ds"
RNG_DIR = "rng"
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "megafim_tokenizer.model"
"""The sentencepiece model a Hugging Face export carries beside its ``tokenizer.json``."""
HF_SPECIAL_TOKENS_FILE = "megafim_special_tokens.json"
"""A Hugging Face export of a run with a Hugging Face tokenizer: ``{name: spelling}`` of its end-of-text
and FIM tokens, which megafim's tools read back with ``megafim_tokenizer.model``."""

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit this run; the message names the
    file (a ``ValueError`` so that every tool's one-line error handling reports it)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_step_dir_name(name: str) -> bool:
    return _STEP_DIR.match(name) is not None


def step_of(ckpt_dir: Path) -> int:
    """The step of a checkpoint directory named by ``step_dir_name``."""
    match = _STEP_DIR.match(Path(ckpt_dir).name)
    if match is None:
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint directory (step_NNNNNNNN)")
    return int(match.group(1))


def temp_dir(save_root: Path, step: int) -> Path:
    """Where the save of ``step`` is written before it is renamed to ``step_dir_name(step)``."""
    return Path(save_root) / f"{_TMP_PREFIX}{step_dir_name(step)}"


def rng_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / RNG_DIR / f"rank_{rank}.pt"
