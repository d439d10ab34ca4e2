"""Preemption signals: SIGTERM / SIGUSR1 ask the trainer to save a checkpoint and exit cleanly.

The handler only sets a flag; the loop checks it between steps (``should_stop``) and the ranks agree
through an all-reduce, so that a signal that reaches only some ranks still stops all of them at the
same step (a save is collective).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs handlers for SIGTERM and SIGUSR1 that record the request instead of dying."""

    def __init__(self, enabled: bool = True):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank got a signal (collective: call on all ranks)."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
