"""Load a model to run it: from a megafim checkpoint (any layout) or an exported Hugging Face directory.

A megafim checkpoint keeps a layout-free copy of the weights beside DeepSpeed's shards
(``step_*/model/``: ``stage_<p>.safetensors`` with full tensors by name, one file per pipeline stage,
and ``model_config.json``; see ``megafim/training/checkpoint_io.py``), so any tensor-, pipeline- or
data-parallel layout and any ZeRO stage loads the same way, one tensor at a time. Its tokenizer is the
``tokenizer.model`` copied into the checkpoint, else the one its ``config.yaml`` names. A Hugging Face
directory written by ``tools/convert_checkpoint_to_hf.py`` carries ``megafim_tokenizer.model``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megafim.convert.streaming import save_safetensors_streaming
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT
from megafim.training.checkpoint_io import MODEL_DIR, read_model_state

HF_TOKENIZER_FILE = "megafim_tokenizer.model"
CONFIG_FILE, TOKENIZER_FILE = "model_config.json", "tokenizer.model"


@dataclass
class LoadedModel:
    model: GPT
    tokenizer_path: str | None
    kind: str  # "megafim" or "hf"
    source: Path


def checkpoint_dir(path: str | Path, iteration: int | None = None) -> Path:
    """The checkpoint to read: ``path`` itself, ``step_<iteration>`` under it, or the one ``latest`` names."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint {str(root)!r}: no such file or directory")
    if iteration is not None:
        chosen = root / f"step_{iteration:08d}"
        if not chosen.is_dir():
            steps = sorted(p.name for p in root.glob("step_*"))
            raise FileNotFoundError(f"{root}: no checkpoint for iteration {iteration} (found: {steps or 'none'})")
        return chosen
    if (root / MODEL_DIR).is_dir():
        return root
    pointer = root / "latest"
    if pointer.is_file():
        return root / pointer.read_text().strip()
    raise FileNotFoundError(f"{root}: neither a checkpoint directory (no {MODEL_DIR}/) nor a save directory "
                            "(no 'latest' file)")


def read_megafim_weights(ckpt: Path) -> tuple[Mapping[str, torch.Tensor], ModelConfig]:
    """The full weights (read lazily, a tensor at a time as they are used) and the ModelConfig."""
    return read_model_state(ckpt)


def megafim_tokenizer_path(ckpt: Path) -> str | None:
    if (ckpt / TOKENIZER_FILE).is_file():
        return str(ckpt / TOKENIZER_FILE)
    config_yaml = ckpt / "config.yaml"
    if config_yaml.is_file():
        data = yaml.safe_load(config_yaml.read_text()) or {}
        return (data.get("data") or {}).get("tokenizer_model") or None
    return None


def load_model(path: str | Path, *, iteration: int | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A model in eval mode from a megafim checkpoint / save directory, or a Hugging Face directory."""
    path = Path(path)
    if (path / "config.json").is_file() and iteration is None:
        from megafim.convert.hf_model import hf_to_megafim

        state, config = hf_to_megafim(path, dtype=dtype)
        tokenizer = str(path / HF_TOKENIZER_FILE) if (path / HF_TOKENIZER_FILE).is_file() else None
        kind, source = "hf", path
    else:
        source = checkpoint_dir(path, iteration)
        state, config = read_megafim_weights(source)
        tokenizer, kind = megafim_tokenizer_path(source), "megafim"
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, kind, source)


def save_model_dir(model_dir: Path, state: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    """Write the layout-free weights and their config (what ``read_megafim_weights`` reads)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    # Streamed: a lazy ``state`` (a converter's) is read and written one tensor at a time.
    save_safetensors_streaming(state, model_dir / "stage_00.safetensors", metadata={"format": "pt"})
    (model_dir / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
