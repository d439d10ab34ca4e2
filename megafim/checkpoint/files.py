"""Atomic checkpoint directories: write into ``.tmp-step_N/``, fsync, write the manifest, rename to
``step_N/``, then move the ``latest`` pointer.

A kill at any point of a save leaves ``latest`` naming the previous complete checkpoint: the new one
only becomes visible through two atomic renames (the directory, then the pointer), each after fsync.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megafim.checkpoint import manifest
from megafim.checkpoint.format import LATEST, is_step_dir_name, step_dir_name, step_of, temp_dir


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (and ``path`` itself) so a rename is durable."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)


def tokenizer_source(tokenizer_model: str | os.PathLike) -> Path:
    """The one file a checkpoint keeps of ``tokenizer_model``: a sentencepiece ``.model`` or a
    ``tokenizer.json`` as it is, a Hugging Face tokenizer directory's ``tokenizer.json`` (the loaders
    tell the two kinds apart by content; the export rebuilds ``tokenizer_config.json`` and
    ``special_tokens_map.json`` from it). FileNotFoundError, naming the path, when there is none."""
    src = Path(tokenizer_model)
    if src.is_dir():
        if not (src / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer {src}: a directory without tokenizer.json")
        return src / "tokenizer.json"
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer {src}: no such file or directory")
    return src


def begin(save_root: Path, step: int) -> Path:
    """Create a fresh temporary directory for the save of ``step`` (one process only) and return it."""
    save_root = Path(save_root)
    save_root.mkdir(parents=True, exist_ok=True)
    for stale in save_root.glob(".tmp-step_*"):  # left over by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(save_root, step)
    tmp.mkdir()
    return tmp


def commit(save_root: Path, step: int, keep_last: int) -> Path:
    """Make the save of ``step`` visible (one process, after every rank has written its files).

    Write the manifest (a checksum of every file; last, so that its presence means the files are
    complete), fsync the temporary directory, rename it to its final name, fsync the parent, then
    atomically point ``latest`` at it; finally prune to the last ``keep_last`` (0 keeps all)."""
    save_root = Path(save_root)
    tmp, final = temp_dir(save_root, step), save_root / step_dir_name(step)
    manifest.write(tmp)
    fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. a signal right after an interval save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(save_root)
    write_text_atomic(save_root / LATEST, final.name + "\n")
    prune(save_root, keep_last)
    return final


def list_checkpoints(save_root: Path) -> list[Path]:
    """Checkpoint directories (``step_N``) under ``save_root``, oldest first."""
    root = Path(save_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_step_dir_name(p.name)]
    return sorted(found, key=step_of)


def prune(save_root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; never the one ``latest`` names."""
    if keep_last <= 0:
        return
    pointer = Path(save_root) / LATEST
    latest = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    for old in list_checkpoints(save_root)[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
