"""Load a model to run it: from a megafim checkpoint (any layout) or an exported Hugging Face directory.

The checkpoint format belongs to ``megafim.checkpoint`` (docs/checkpoints.md): this module finds the
checkpoint with its finder, checks its manifest, and reads the layout-free weights one tensor at a
time, so any tensor-, pipeline- or data-parallel layout and any ZeRO stage loads the same way. The
tokenizer is the ``tokenizer.model`` copied into the checkpoint, else the one its ``config.yaml``
names, with the special-token spellings the run named (``data.special_tokens``). A Hugging Face
directory written by ``tools/convert_checkpoint_to_hf.py`` carries ``megafim_tokenizer.model`` and,
for a Hugging Face tokenizer, ``megafim_special_tokens.json``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megafim.checkpoint import find, manifest
from megafim.checkpoint.format import HF_SPECIAL_TOKENS_FILE, HF_TOKENIZER_FILE
from megafim.checkpoint.sharded import INDEX
from megafim.checkpoint.weights import read_model_state, special_tokens, tokenizer_path
from megafim.model.gpt import GPT


@dataclass
class LoadedModel:
    model: GPT
    tokenizer_path: str | None
    kind: str  # "megafim" or "hf"
    source: Path
    special_tokens: dict[str, str] = field(default_factory=dict)
    """Spellings of end-of-text / FIM tokens the training run named, {} for the known spellings."""

    def load_tokenizer(self, path: str | None = None):
        """The model's tokenizer (``path`` instead of its own, e.g. a ``--tokenizer-model`` flag), with
        the special tokens its run named; FileNotFoundError when there is none."""
        path = path or self.tokenizer_path
        if path is None:
            raise FileNotFoundError(f"{self.source}: no tokenizer found with the model; pass --tokenizer-model")
        return load_checkpoint_tokenizer(path, self.special_tokens)


def load_checkpoint_tokenizer(path: str, named: dict[str, str]):
    """The tokenizer at ``path`` with the special-token spellings a run named (Hugging Face tokenizers
    only: a sentencepiece model's special pieces are fixed)."""
    from megafim.data.tokenizer import load_tokenizer
    from megafim.data.tokenizer_hf import is_hf_tokenizer_path

    return load_tokenizer(path, None, (named or None) if is_hf_tokenizer_path(path) else None)


def hf_export_special_tokens(hf_dir: Path) -> dict[str, str]:
    """``megafim_special_tokens.json`` of an export ({} for a sentencepiece run or an HF model)."""
    path = Path(hf_dir) / HF_SPECIAL_TOKENS_FILE
    if not path.is_file():
        return {}
    try:
        named = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a JSON object of special-token spellings ({exc})") from None
    if not isinstance(named, dict):
        raise ValueError(f"{path}: not a JSON object of special-token spellings")
    return named


def load_model(path: str | Path, *, iteration: int | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, verify: bool = True) -> LoadedModel:
    """A model in eval mode from a megafim checkpoint / save directory, or a Hugging Face directory.
    A megafim checkpoint's weight files are checked against its manifest (``verify``)."""
    path = Path(path)
    if (path / "config.json").is_file() and iteration is None:
        from megafim.convert.hf_model import hf_to_megafim

        state, config = hf_to_megafim(path, dtype=dtype)
        tokenizer = str(path / HF_TOKENIZER_FILE) if (path / HF_TOKENIZER_FILE).is_file() else None
        return LoadedModel(_build(state, config, device, dtype), tokenizer, "hf", path,
                           hf_export_special_tokens(path))
    source = find.resolve(path, iteration)
    named = special_tokens(source)
    if not verify:
        state, config = read_model_state(source)
        return LoadedModel(_build(state, config, device, dtype), tokenizer_path(source), "megafim", source, named)
    return LoadedModel(_verified_build(source, device, dtype), tokenizer_path(source), "megafim", source, named)


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
    with ThreadPoolExecutor(1) as hasher:  # one thread: each file's hash updates run in order
        state, config = read_model_state(source, data["files"], hasher, data["algorithm"])
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
