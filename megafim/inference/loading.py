"""Load a model to run it: from a megafim checkpoint (any layout) or an exported Hugging Face directory.

The checkpoint format belongs to ``megafim.checkpoint`` (docs/checkpoints.md): this module finds the
checkpoint with its finder, checks its manifest, and reads the layout-free weights one tensor at a
time, so any tensor-, pipeline- or data-parallel layout and any ZeRO stage loads the same way. The
tokenizer is the ``tokenizer.model`` copied into the checkpoint, else the one its ``config.yaml``
names. A Hugging Face directory written by ``tools/convert_checkpoint_to_hf.py`` carries
``megafim_tokenizer.model``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from megafim.checkpoint import find, manifest
from megafim.checkpoint.format import HF_TOKENIZER_FILE
from megafim.checkpoint.sharded import INDEX
from megafim.checkpoint.weights import read_model_state, tokenizer_path
from megafim.model.gpt import GPT


@dataclass
class LoadedModel:
    model: GPT
    tokenizer_path: str | None
    kind: str  # "megafim" or "hf"
    source: Path


def load_model(path: str | Path, *, iteration: int | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, verify: bool = True) -> LoadedModel:
    """A model in eval mode from a megafim checkpoint / save directory, or a Hugging Face directory.
    A megafim checkpoint's weight files are checked against its manifest (``verify``)."""
    path = Path(path)
    if (path / "config.json").is_file() and iteration is None:
        from megafim.convert.hf_model import hf_to_megafim

        state, config = hf_to_megafim(path, dtype=dtype)
        tokenizer = str(path / HF_TOKENIZER_FILE) if (path / HF_TOKENIZER_FILE).is_file() else None
        kind, source = "hf", path
        return LoadedModel(_build(state, config, device, dtype), tokenizer, kind, source)
    source = find.resolve(path, iteration)
    if not verify:
        state, config = read_model_state(source)
        return LoadedModel(_build(state, config, device, dtype), tokenizer_path(source), "megafim", source)
    return LoadedModel(_verified_build(source, device, dtype), tokenizer_path(source), "megafim", source)


def _verified_build(source: Path, device, dtype) -> GPT:
    """The model, returned only once its files match the manifest. The weight shards are hashed as
    their bytes are read for loading (one pass, ``verified_read.py``), in a thread beside the load; the
    small files (index, config) first. A load that fails on a corrupt file reports the verification's
    error, which names the file. Format 1 (no index) hashes in a thread beside the load."""
    data = manifest.read(source)
    model_files = manifest.files_under(source, "model/")
    if data is None or not (source / "model" / INDEX).is_file():
        with ThreadPoolExecutor(1) as pool:
            check = pool.submit(manifest.verify, source, model_files)
            try:
                state, config = read_model_state(source)
                model = _build(state, config, device, dtype)
            except Exception:
                check.result()
                raise
            check.result()
        return model
    manifest.verify(source, [rel for rel in model_files if not rel.endswith(".safetensors")])
    with ThreadPoolExecutor(1) as hasher:  # one thread: each file's CRC updates run in order
        state, config = read_model_state(source, checksums=data["files"], hasher=hasher)
        try:
            model = _build(state, config, device, dtype)
        except Exception:
            state.finish()
            raise
        state.finish()
    return model


def _build(state, config, device, dtype) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device=device, dtype=dtype).eval()
