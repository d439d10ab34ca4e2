"""The DeepSpeed config, generated from ours, with a user's JSON merged over it.

The optimizer and the learning-rate schedule are ours (a torch AdamW and ``config.lr_at``), passed to
``deepspeed.initialize`` as objects: DeepSpeed's fused Adam JIT-builds a C++ op on the CPU (~90 s on a
fresh machine; docs/training.md) and we want one schedule formula shared by the trainer, the logs and
the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megafim.training.config import ConfigError, TrainConfig, grad_accumulation_steps


def resolve_precision(cfg: TrainConfig) -> str:
    """``bf16`` or ``fp32``: ``auto`` is bf16 on a GPU and fp32 on the CPU."""
    if cfg.schedule.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return cfg.schedule.precision


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for ``cfg`` on ``world_size`` ranks (before the user's file is merged)."""
    gas = grad_accumulation_steps(cfg, world_size)
    ds: dict = {
        # DeepSpeed's data-parallel group holds the context-parallel ranks too (they read the same samples)
        "train_batch_size": cfg.batch.global_batch_size * cfg.parallel.context,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optimizer.clip_grad,
        "steps_per_print": 10**9,  # our logger prints; keep DeepSpeed's own step lines quiet
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": resolve_precision(cfg) == "bf16"},
        "fp16": {"enabled": False},
        # Our optimizer is a torch one: allow it under ZeRO without DeepSpeed's warning/refusal.
        "zero_allow_untested_optimizer": True,
    }
    if cfg.parallel.zero_stage >= 2:
        # Deterministic, comparable reductions: no overlap tricks that reorder floating-point sums.
        ds["zero_optimization"].update(overlap_comm=False, contiguous_gradients=True)
    if cfg.parallel.zero_stage == 3:
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return ds


def load_user_config(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"deepspeed_config: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed_config: {path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed_config: {path} must hold a JSON object")
    return data


# Keys a user's JSON must not change: our loop, optimizer and data pipeline depend on them.
_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "optimizer", "scheduler")


def effective_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """Generated config with ``cfg.deepspeed_config`` merged over it; conflicts on owned keys raise."""
    ds = build_deepspeed_config(cfg, world_size)
    if not cfg.deepspeed_config:
        return ds
    user = load_user_config(cfg.deepspeed_config)
    for key in _OWNED:
        if key in user and user[key] != ds.get(key):
            raise ConfigError(
                f"deepspeed_config: {cfg.deepspeed_config} sets {key!r} = {user[key]!r}; megafim derives it "
                f"({ds.get(key)!r}) from the batch/optimizer sections: set those instead")
    merged = deep_merge(ds, user)
    if merged["zero_optimization"].get("stage") != cfg.parallel.zero_stage:
        raise ConfigError(f"deepspeed_config: {cfg.deepspeed_config} sets zero_optimization.stage = "
                          f"{merged['zero_optimization'].get('stage')}, but parallel.zero_stage = "
                          f"{cfg.parallel.zero_stage}: use --zero-stage")
    return merged


def write_and_describe(ds: dict, save_dir: str) -> str:
    """Write the effective DeepSpeed config to ``<save_dir>/deepspeed_config.json`` (when saving) and
    return the one log line that says what it is and where it went."""
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") \
        else "fp32"
    line = (f"DeepSpeed: ZeRO-{zero}, {precision}, micro-batch {ds['train_micro_batch_size_per_gpu']}, "
            f"{ds['gradient_accumulation_steps']} accumulation steps, clip {ds.get('gradient_clipping', 0)}")
    if not save_dir:
        return line
    path = Path(save_dir) / "deepspeed_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return f"{line} (full config: {path})"
