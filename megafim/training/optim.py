"""The optimizer: torch AdamW with decay/no-decay groups, and a switch that skips one update.

A NaN/inf loss must not move the weights or the Adam moments. DeepSpeed (ZeRO 0-3) calls the
wrapped optimizer's ``step()`` at the accumulation boundary (ZeRO once per parameter group, ZeRO 1/2
not at all when they see non-finite gradients) and zeroes the gradients afterwards, so the cleanest
skip that works the same under every ZeRO stage is an optimizer whose ``step()`` does nothing while
the trainer says so, for one engine step: the gradients (NaN) are discarded by DeepSpeed's zeroing.
"""

from __future__ import annotations

import torch

from megafim.training.config import OptimizerSection


class SkippableAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step()`` is a no-op from ``skip_next_step()`` to ``end_step()``.

    The skip lasts one engine step, not one call: ZeRO 1/2/3 call ``step()`` once per parameter
    group, and ZeRO 1/2 do not call it at all when they find the gradients non-finite themselves."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = False

    def skip_next_step(self) -> None:
        self._skip = True

    def end_step(self) -> None:
        """Called by the trainer after every engine step: the next one updates again."""
        self._skip = False

    @torch.no_grad()
    def step(self, closure=None):
        if self._skip:
            return None
        return super().step(closure)

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms' scales and biases (1-d tensors) get no weight decay."""
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimizerSection) -> SkippableAdamW:
    # The fused CUDA kernel on a GPU (one launch for all tensors); torch's default path on the CPU.
    fused = bool(torch.cuda.is_available() and next(model.parameters()).is_cuda)
    return SkippableAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                          eps=cfg.eps, fused=fused or None)
