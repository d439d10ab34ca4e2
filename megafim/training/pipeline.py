"""Our own 1F1B pipeline schedule, so that ZeRO stages 0-3 work with pipeline parallelism.

DeepSpeed's pipeline engine refuses ZeRO-2/3. Here each stage is an ordinary DeepSpeed engine over
its own parameters and data-parallel group, and the schedule only decides the order of forwards and
backwards and moves activations between neighbouring stages (docs/training.md argues the choice).

- The last stage's backward is ``engine.backward(loss)`` (DeepSpeed divides by the accumulation
  steps); every other stage calls ``engine.backward((output * grad).sum(), scale_wrt_gas=False)``,
  a scalar whose gradient with respect to ``output`` is exactly the received ``grad``, so each stage
  calls ``engine.backward`` once per micro-batch (docs/platform_notes.md: more than once is wrong under ZeRO).
- ``engine.step()`` follows every backward, after the input gradient was sent; DeepSpeed updates only
  at the accumulation boundary.
- Sends are non-blocking and waited for at the end of the step; receives block. Activations travel
  with tag 0 and gradients with tag 1, so each (peer, tag) channel carries one kind, in micro-batch
  order, and the order of posts can never deadlock.

Schedule of stage s out of P with M micro-batches (Narayanan et al. 2021, PipeDream-flush):
warm-up ``min(P - s - 1, M)`` forwards, then alternate one forward / one backward, then the remaining
backwards. At most ``P - s`` micro-batches' activations are alive on stage s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TAG_ACTIVATION, TAG_GRAD = 0, 1


@dataclass
class StageComm:
    """Where this stage's neighbours are and what an activation between stages looks like."""

    stage: int
    """This rank's pipeline stage, 0-based."""
    n_stages: int
    """Pipeline depth P."""
    prev_rank: int | None
    """Global rank of the previous stage in this rank's pipeline (None on the first stage)."""
    next_rank: int | None
    """Global rank of the next stage (None on the last stage)."""
    activation_shape: tuple
    """Shape of one micro-batch's activation between stages, e.g. (micro_batch, seq, hidden)."""
    dtype: torch.dtype = torch.float32
    """Activation dtype on the wire."""
    device: torch.device = torch.device("cpu")
    """Device the activations live on."""
    _pending: list = field(default_factory=list)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1

    def _recv(self, peer: int, tag: int) -> torch.Tensor:
        buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=peer, tag=tag)
        return buf

    def _send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        self._pending.append((dist.isend(tensor, dst=peer, tag=tag), tensor))  # keep the buffer alive

    def recv_forward(self) -> torch.Tensor | None:
        if self.is_first:
            return None
        return self._recv(self.prev_rank, TAG_ACTIVATION).requires_grad_(True)

    def send_forward(self, output: torch.Tensor) -> None:
        if not self.is_last:
            self._send(output, self.next_rank, TAG_ACTIVATION)

    def recv_backward(self) -> torch.Tensor | None:
        if self.is_last:
            return None
        return self._recv(self.next_rank, TAG_GRAD)

    def send_backward(self, grad: torch.Tensor | None) -> None:
        if not self.is_first:
            if grad is None:
                raise RuntimeError(f"pipeline stage {self.stage}: the received activation got no gradient; "
                                   "the stage's output does not depend on its input")
            self._send(grad, self.prev_rank, TAG_GRAD)

    def wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


def one_f_one_b_order(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """The ("F"|"B", micro-batch) sequence stage ``stage`` runs; a pure function, tested on its own."""
    warmup = min(n_stages - stage - 1, n_micro)
    order, f, b = [], 0, 0
    for _ in range(warmup):
        order.append(("F", f))
        f += 1
    while f < n_micro:
        order.append(("F", f))
        f += 1
        order.append(("B", b))
        b += 1
    while b < n_micro:
        order.append(("B", b))
        b += 1
    return order


ForwardFn = Callable[[int, "torch.Tensor | None"], "torch.Tensor"]
BackwardFn = Callable[["torch.Tensor", "torch.Tensor | None"], None]


def run_1f1b(comm: StageComm, n_micro: int, forward: ForwardFn, backward: BackwardFn,
             after_backward: Callable[[int], None]) -> None:
    """Run one optimizer step's micro-batches through this stage in 1F1B order.

    ``forward(i, received)`` runs micro-batch i (``received`` is the previous stage's activation,
    None on the first stage) and returns the stage output (the scalar loss on the last stage).
    ``backward(output, grad)`` back-propagates (``grad`` is None on the last stage);
    ``after_backward(i)`` (``engine.step``) runs once the input gradient is on its way to the previous
    stage: at the accumulation boundary it clips the gradient norm with a collective over all stages,
    which would deadlock if the previous stage were still waiting for that gradient.
    Activations are kept only between a micro-batch's forward and its backward."""
    alive: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for kind, i in one_f_one_b_order(comm.stage, comm.n_stages, n_micro):
        if kind == "F":
            received = comm.recv_forward()
            output = forward(i, received)
            comm.send_forward(output)
            alive[i] = (received, output)
        else:
            received, output = alive.pop(i)
            grad = comm.recv_backward()
            backward(output, grad)
            comm.send_backward(None if received is None else received.grad)
            after_backward(i)
    comm.wait_sends()
