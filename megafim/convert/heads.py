"""Extra heads for a model that has fewer than it needs (an HF Llama turned into an n-head megafim model).

Each new head is built on its own (one transformer block), so adding heads to a large model never
holds more than one layer besides what the converter streams."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from megafim.model.config import ModelConfig
from megafim.model.gpt import Block, initial_value

HEAD_INITS = ("random", "copy")


class _OneHead(nn.Module):
    """Head k alone, under the names GPT gives its parameters."""

    def __init__(self, config: ModelConfig, k: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({str(k): Block(config)})


def fresh_head(config: ModelConfig, k: int, seed: int) -> dict[str, torch.Tensor]:
    """Head k's tensors by megafim name, initialised as GPT's are (``initial_value``: normal(0, init_std),
    residual projections scaled by depth, norms ones), from ``seed + k``."""
    with torch.device("meta"):  # names and shapes only
        holder = _OneHead(config, k)
    return {name: initial_value(config, name, p.shape, seed + k) for name, p in holder.named_parameters()}


def head_initialiser(config: ModelConfig, how: str, seed: int,
                     head0: Mapping[str, torch.Tensor]) -> Callable[[int], dict[str, torch.Tensor]]:
    """``init_new_head(k)`` for ``hf_to_megafim``: fresh weights, or a copy of head 0 (read from ``head0``,
    a mapping that holds ``heads.0.*``, lazily or not)."""
    if how not in HEAD_INITS:
        raise ValueError(f"head initialisation {how!r}: expected one of {', '.join(HEAD_INITS)}")
    if how == "copy":
        return lambda k: {name.replace("heads.0.", f"heads.{k}.", 1): head0[name].clone()
                          for name in head0 if name.startswith("heads.0.")}
    return lambda k: fresh_head(config, k, seed)
