"""Finding a checkpoint: the one finder that training, inference, evaluation and the converters share.

A checkpoint directory is a ``step_N/`` that holds ``trainer_state.json``; a save directory holds
checkpoints and a ``latest`` file naming the newest complete one. Every reader accepts either.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megafim.checkpoint import manifest
from megafim.checkpoint.files import list_checkpoints
from megafim.checkpoint.format import LATEST, TRAINER_STATE, CheckpointError, is_step_dir_name, step_dir_name


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / TRAINER_STATE).is_file()


def latest_checkpoint(load_root: Path) -> Path | None:
    """The checkpoint ``<load_root>/latest`` names, ``load_root`` itself when it is a checkpoint
    directory, or ``None`` when the save directory holds none yet."""
    root = Path(load_root)
    if is_checkpoint(root):
        return root
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    if not is_step_dir_name(name) or not is_checkpoint(path):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint in {root}")
    return path


def resolve(path: str | Path, iteration: int | None = None) -> Path:
    """The checkpoint to read: ``step_<iteration>`` under ``path``, ``path`` itself, or the one its
    ``latest`` names; ``CheckpointError`` (naming the directory) when there is none."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint {str(root)!r}: no such file or directory")
    if iteration is not None:
        chosen = root / step_dir_name(iteration)
        if not is_checkpoint(chosen):
            steps = [p.name for p in list_checkpoints(root)]
            raise CheckpointError(f"{root}: no checkpoint for iteration {iteration} "
                                  f"(found: {steps or 'none'})")
        return chosen
    found = latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"{root}: neither a checkpoint directory (no {TRAINER_STATE}) nor a save "
                              f"directory (no '{LATEST}' file)")
    return found


def holds_checkpoints(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint, or a save directory with a ``latest`` pointer or a ``step_N``."""
    root = Path(path)
    return is_checkpoint(root) or (root / LATEST).is_file() or bool(list_checkpoints(root))


def verified_for_resume(load: str | Path, verify: bool, say: Callable[[str], None]) -> Path | None:
    """The checkpoint a ``--load`` resumes from, checked against its manifest.

    ``load`` naming one checkpoint: that one, or ``CheckpointError`` when it fails verification. A
    save directory: the one ``latest`` names, else (it fails verification, or the pointer is broken)
    the newest older complete checkpoint that verifies, saying so through ``say``. ``None`` when the
    directory holds no checkpoint."""
    root = Path(load)
    if is_checkpoint(root):
        if verify and not manifest.verify(root):
            say(f"resume: {root} has no manifest (an older format): loaded unverified")
        return root
    try:
        first = latest_checkpoint(root)
    except CheckpointError as exc:
        say(f"resume: {exc}; looking for an older checkpoint")
        first = None
    candidates = ([first] if first else []) + [p for p in reversed(list_checkpoints(root))
                                               if is_checkpoint(p) and p != first]
    if not candidates:
        return None
    for ckpt in candidates:
        if not verify:
            return ckpt
        try:
            if not manifest.verify(ckpt):
                say(f"resume: {ckpt} has no manifest (an older format): loaded unverified")
            return ckpt
        except CheckpointError as exc:
            say(f"resume: {exc}; skipping {ckpt.name}")
    raise CheckpointError(f"{root}: none of its {len(candidates)} checkpoints verifies (see above)")
