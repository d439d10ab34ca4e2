"""megafim weights <-> a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory, one
tensor at a time.

The trunk plus head 0 are a Llama, or a Qwen2 with ``qkv_bias`` (``megafim/model/hf_keys.py`` holds
the key map, no tensor is permuted; ``megafim/convert/hf_config.py`` translates config.json).
Heads 1..n-1 have no Llama counterpart: they go to ``mtp_heads.safetensors`` beside the model,
described by ``mtp_heads.json`` (docs/conversion.md). Tensors are read lazily from the source
(``safetensors.safe_open``, one tensor per access) and written in shards of at most ``max_shard_bytes``,
so memory stays near one shard whatever the model size (benchmarks/convert_memory.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from megafim.checkpoint.safetensors_stream import (LazySafetensors, LazyState, TensorSource, save_safetensors_streaming,
                                       tensor_spec)
from megafim.convert.hf_config import hf_config_json, model_config_from_hf_config
from megafim.model.config import ModelConfig
from megafim.model.hf_keys import block_keys, hf_key_map

HEADS_FILE = "mtp_heads.safetensors"
HEADS_CONFIG = "mtp_heads.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def extra_head_keys(config: ModelConfig) -> list[str]:
    """megafim names of heads 1..n-1 (everything the Llama directory cannot hold)."""
    return [f"heads.{k}.{key}" for k in range(1, config.n_future) for key in block_keys(config)]


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, stem: str,
                  max_shard_bytes: int) -> dict[str, str]:
    """Write (name, tensor) pairs into ``stem``.safetensors shards; returns {name: file}."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    written: list[Path] = []
    where: dict[str, str] = {}

    def flush() -> None:
        path = out / f"{stem}-{len(written) + 1:05d}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        written.append(path)
        where.update({name: path.name for name in shards[-1]})
        shards[-1] = {}

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if shards[-1]:
        flush()
    # Hugging Face names shards "<stem>-00001-of-00003.safetensors", or "<stem>.safetensors" if alone.
    renames = {p.name: (f"{stem}.safetensors" if len(written) == 1 else
                        f"{stem}-{i + 1:05d}-of-{len(written):05d}.safetensors") for i, p in enumerate(written)}
    for path in written:
        path.rename(out / renames[path.name])
    return {name: renames[file] for name, file in where.items()}


def megafim_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig, out_dir: str | Path, *,
                  dtype: str = "bfloat16", eos_token_id: int | None = None,
                  max_shard_bytes: int = 2 << 30) -> Path:
    """Write a Hugging Face Llama (Qwen2 with ``qkv_bias``) directory for the trunk + head 0, and the
    extra heads beside it.

    ``state`` maps megafim parameter names to full (unsharded) tensors; it may load them lazily."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_map = hf_key_map(config)
    expected = set(key_map) | set(extra_head_keys(config))
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} tensors of a {config.n_future}-head model, "
                       f"e.g. {missing[:3]}")
    cast = DTYPES[dtype]

    def hf_tensors():
        for ours, theirs in key_map.items():
            yield theirs, state[ours].to(cast)

    where = _write_shards(hf_tensors(), out, "model", max_shard_bytes)
    if len(set(where.values())) > 1:
        total = sum(math.prod(tensor_spec(state, k)[0]) * cast.itemsize for k in key_map)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    hf_config = hf_config_json(config, dtype=dtype, eos_token_id=eos_token_id)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {"eos_token_id": eos_token_id, "bos_token_id": None, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    extra = extra_head_keys(config)
    if extra:
        # One tensor at a time: the heads file holds n_future - 1 whole layers.
        heads = LazyState({k: TensorSource(tensor_spec(state, k)[0], cast, lambda k=k: state[k].to(cast))
                           for k in extra})
        save_safetensors_streaming(heads, out / HEADS_FILE, metadata={"format": "pt"})
        description = {
            "n_future": config.n_future,
            "heads_in_file": list(range(1, config.n_future)),
            "block_keys": list(block_keys(config)),
            "shared": {"final_norm": "model.norm.weight", "unembedding": "model.embed_tokens.weight"
                       if config.tie_embeddings else "lm_head.weight"},
            "usage": "head k (k >= 1) is one decoder layer applied to the output of HF layer "
                     "n_layers - 2 (the trunk's last layer); its output goes through the shared final "
                     "norm and lm_head and predicts the token k+1 positions ahead.",
        }
        (out / HEADS_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
    return out


def model_config_from_hf(hf_dir: str | Path, n_future: int | None = None, *,
                         untie_embeddings: bool = False) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama / Qwen2 directory (``n_future`` from mtp_heads.json, or
    given). ``untie_embeddings`` gives a tied model its own unembedding, a copy of the embedding
    (pipeline parallelism needs that: the two live on different stages)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    heads_cfg = Path(hf_dir) / HEADS_CONFIG
    stored_heads = json.loads(heads_cfg.read_text())["n_future"] if heads_cfg.is_file() else 1
    config = model_config_from_hf_config(c, str(path), n_future or stored_heads)
    return config.replace(tie_embeddings=False) if untie_embeddings else config


def hf_to_megafim(hf_dir: str | Path, *, n_future: int | None = None,
                  init_new_head: Callable[[int], dict[str, torch.Tensor]] | None = None,
                  dtype: torch.dtype = torch.float32,
                  untie_embeddings: bool = False) -> tuple[LazyState, ModelConfig]:
    """A megafim state dict and ModelConfig from a Hugging Face Llama / Qwen2 directory.

    The state is lazy: each tensor is read (and cast to ``dtype``) when it is accessed, so a
    converter that writes tensor by tensor holds one at a time. Heads the directory does not hold
    (``n_future`` above what it stores) come from ``init_new_head(k)``, which returns head k's tensors
    by megafim name (``megafim.convert.heads`` offers a fresh initialisation and a copy of head 0); it
    is called once per new head, when that head's first tensor is accessed."""
    hf_dir = Path(hf_dir)
    config = model_config_from_hf(hf_dir, n_future, untie_embeddings=untie_embeddings)
    files = sorted(p for p in hf_dir.glob("*.safetensors") if p.name != HEADS_FILE)
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights")
    hf = LazySafetensors(files)

    def read(store: LazySafetensors, key: str) -> TensorSource:
        return TensorSource(store.spec(key)[0], dtype, lambda: store[key].to(dtype))

    sources: dict[str, TensorSource] = {}
    for ours, theirs in hf_key_map(config).items():
        if theirs in hf:
            sources[ours] = read(hf, theirs)
        elif theirs == "lm_head.weight" and untie_embeddings:  # a copy of the tied embedding
            sources[ours] = read(hf, "model.embed_tokens.weight")
        else:
            raise KeyError(f"{hf_dir}: tensor {theirs!r} is missing")
    heads_file = hf_dir / HEADS_FILE
    stored = LazySafetensors([heads_file]) if heads_file.is_file() else {}
    new_head = _NewHeads(init_new_head, dtype)
    for k in range(1, config.n_future):
        names = [f"heads.{k}.{key}" for key in block_keys(config)]
        if all(n in stored for n in names):
            sources.update({n: read(stored, n) for n in names})
        elif init_new_head is None:
            raise ValueError(f"{hf_dir} holds no head {k}; pass init_new_head to create it")
        else:  # a new head has head 0's shapes
            sources.update({n: TensorSource(sources[n.replace(f"heads.{k}.", "heads.0.", 1)].shape, dtype,
                                            lambda k=k, n=n: new_head(k, n)) for n in names})
    return LazyState(sources), config


class _NewHeads:
    """``init_new_head(k)[name]``, keeping only the most recent head's tensors (heads are written in order)."""

    def __init__(self, init_new_head, dtype: torch.dtype) -> None:
        self.init, self.dtype, self.k, self.tensors = init_new_head, dtype, None, {}

    def __call__(self, k: int, name: str) -> torch.Tensor:
        if self.k != k:
            self.k, self.tensors = k, self.init(k)
        if name not in self.tensors:
            raise KeyError(f"init_new_head({k}) returned no tensor {name!r}")
        return self.tensors[name].to(self.dtype)
