"""Asynchronous saves: copy the state to host memory, write it in a background thread, commit when every
rank's files are complete (docs/checkpoints.md, "Asynchronous saves").

- ``host_copy``: a copy of a state (nested dicts, lists, tuples of tensors) in host memory that keeps
  which tensors share a storage, so ``torch.save`` of the copy writes the same bytes as of the original;
- ``HostBuffers``: the memory of those copies, reused from one save to the next; a deferred save only
  records which storage goes into which buffer, and the writer thread copies the bytes;
- ``DeferredSaves``: stands in for DeepSpeed's checkpoint engine during ``engine.save_checkpoint`` and
  keeps (path, host copy) instead of writing, for the writer thread to write with the real engine;
- ``Writer``: one per rank; runs a save's copy and then its writes in a thread and waits for the
  previous one first; ``guard`` makes an optimizer's ``step`` wait until the copy is done (the step is
  what changes the copied state);
- completion markers: each rank, once its files are written, creates ``.writers/rank_<r>`` (or
  ``rank_<r>.failed`` with the error) in the save's temporary directory; rank 0's writer waits for
  all of them before it writes the manifest and moves ``latest``. Files, not collectives: the writer
  threads never talk over the process group, which belongs to the training loop.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megafim.checkpoint.format import CheckpointError

WRITERS_DIR = ".writers"
DELAY_ENV = "MEGAFIM_CHECKPOINT_WRITE_DELAY"
"""``STEP:SECONDS``: the writes of the save of STEP start SECONDS late (tests simulate a slow disk)."""
COPY_DELAY_ENV = "MEGAFIM_CHECKPOINT_COPY_DELAY"
"""``STEP:SECONDS``: the host copy of the save of STEP starts SECONDS late in the writer thread (tests
check that the optimizer step waits for it)."""


def host_copy(obj, memo: dict | None = None, buffers: HostBuffers | None = None):
    """``obj`` with every tensor copied to host memory (nested dicts, lists, tuples; other values are
    deep-copied). What ``obj`` shares stays shared in the copy: tensors that shared a storage share the
    copy of it (same offset, shape and stride), a tuple or dict met twice is copied once, and a
    ``Parameter`` stays one; so ``torch.save`` of the copy writes the bytes it wrote of ``obj``. Calls
    with the same ``memo`` share their copies too; ``buffers`` supplies the memory of each storage's copy."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = _tensor_copy(obj, memo, buffers)
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type (OrderedDict) and insertion order
        for key, value in obj.items():
            out[key] = host_copy(value, memo, buffers)
    elif type(obj) in (list, tuple):
        items = [host_copy(value, memo, buffers) for value in obj]
        same = type(obj) is tuple and all(a is b for a, b in zip(items, obj))
        out = obj if same else type(obj)(items)  # a tuple of immutable values is itself (as in deepcopy)
    else:
        return copy.deepcopy(obj, memo)
    memo[id(obj)] = out
    memo.setdefault("keep", []).append(obj)  # the ids stay unique while the memo lives
    return out


def _tensor_copy(tensor: torch.Tensor, memo: dict, buffers: HostBuffers | None) -> torch.Tensor:
    storage = tensor.untyped_storage()
    key = (storage.device, storage.data_ptr(), storage.nbytes())
    if key not in memo:
        if buffers is not None:
            memo[key] = buffers.copy_of(storage, key)
        else:
            memo[key] = storage.cpu() if storage.device.type != "cpu" else storage.clone()
    out = torch.empty(0, dtype=tensor.dtype).set_(memo[key], tensor.storage_offset(), tensor.size(),
                                                  tensor.stride())
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=tensor.requires_grad)
    return out.requires_grad_(tensor.requires_grad) if tensor.requires_grad else out


class HostBuffers:
    """The host memory of one rank's copies, kept from one save to the next: the training state lives
    in the same storages from step to step (parameters, ZeRO's flat buffers), so the next save copies
    each into the buffer it had (no allocation, no page faults on fresh memory: a copy into memory
    touched before runs about twice as fast as a clone on the CPU). The cost is that the copies' memory
    stays allocated between saves. Only one save at a time may use them: the writer waits for the
    previous save's writes before the next copy starts.

    A deferred save (``start(deferred=True)``) hands out the buffers at once but copies nothing: it
    keeps each (buffer, storage) pair, which also keeps the storage alive, and ``copy_pending`` copies
    them later (the writer thread, while the next step's forward and backward run). Until then the
    buffers hold stale bytes, and the live storages must not change (``Writer.guard``)."""

    def __init__(self) -> None:
        self._kept: dict[tuple, torch.UntypedStorage] = {}
        self._used: dict[tuple, torch.UntypedStorage] = {}
        self._deferred = False
        self._pending: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []

    def start(self, deferred: bool = False) -> dict:
        """Begin a save's copies; returns its memo (for ``host_copy``). Buffers the last save used and
        this one does not are freed by ``finish``. ``deferred``: copy the bytes in ``copy_pending``."""
        self._kept, self._used = {**self._kept, **self._used}, {}
        self._deferred, self._pending = deferred, []
        return {}

    def finish(self) -> None:
        self._kept = {}

    def copy_of(self, storage: torch.UntypedStorage, key: tuple) -> torch.UntypedStorage:
        buf = self._kept.pop(key, None)
        if buf is None:
            pin = storage.device.type == "cuda"  # a page-locked copy: a direct transfer from the GPU
            buf = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
        if self._deferred:
            self._pending.append((buf, storage))
        else:
            _bytes(buf).copy_(_bytes(storage))
        self._used[key] = buf
        return buf

    def copy_pending(self) -> None:
        """Copy the bytes of a deferred save into the buffers it handed out, and let go of the storages."""
        pending, self._pending = self._pending, []
        for buf, storage in pending:
            _bytes(buf).copy_(_bytes(storage))


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class DeferredSaves:
    """DeepSpeed's checkpoint engine for one ``save_checkpoint``: ``save`` keeps a host copy of each
    state dict and its path; ``write_all`` later writes them through the engine it stood in for."""

    def __init__(self, engine, memo: dict | None = None, buffers: HostBuffers | None = None) -> None:
        self.real = engine.checkpoint_engine
        self.saved: list[tuple[dict, str]] = []
        self._ds_engine = engine
        self._memo, self._buffers = {} if memo is None else memo, buffers

    def __enter__(self) -> DeferredSaves:
        self._ds_engine.checkpoint_engine = self
        return self

    def __exit__(self, *exc) -> None:
        self._ds_engine.checkpoint_engine = self.real
        self._memo = {}  # it references the live state dicts; the copies are in ``saved``

    def save(self, state_dict, path: str) -> None:
        self.saved.append((host_copy(state_dict, self._memo, self._buffers), path))

    def write_all(self) -> None:
        for state_dict, path in self.saved:
            self.real.save(state_dict, path)
        self.saved.clear()

    def __getattr__(self, name):  # create, makedirs, commit, is_decoupled, ...: the real engine's
        return getattr(self.real, name)


def write_delay(step: int, variable: str = DELAY_ENV) -> float:
    """Seconds the writes (or, with ``COPY_DELAY_ENV``, the copy) of ``step`` wait, from the environment
    ``variable`` (0 when unset)."""
    raw = os.environ.get(variable, "")
    if not raw:
        return 0.0
    at, _, seconds = raw.partition(":")
    return float(seconds) if int(at) == step else 0.0


def mark_done(tmp: Path, rank: int, error: BaseException | None = None) -> None:
    """Say that this rank's files of the save in ``tmp`` are complete (or that writing them failed)."""
    folder = Path(tmp) / WRITERS_DIR
    folder.mkdir(exist_ok=True)
    name = f"rank_{rank:05d}" + (".failed" if error else "")
    (folder / f".{name}.tmp").write_text(f"{type(error).__name__}: {error}\n" if error else "")
    os.replace(folder / f".{name}.tmp", folder / name)  # a marker appears whole or not at all


def wait_for_ranks(tmp: Path, world_size: int, timeout_s: float, poll_s: float = 0.05) -> None:
    """Wait until every rank marked its files of the save in ``tmp`` complete, then remove the markers.
    ``CheckpointError`` when a rank's writes failed or not all finished within ``timeout_s``."""
    folder = Path(tmp) / WRITERS_DIR
    deadline = time.monotonic() + timeout_s
    while True:
        failed = sorted(folder.glob("rank_*.failed"))
        if failed:
            raise CheckpointError(f"{failed[0]}: {failed[0].read_text().strip()} (the save in {tmp} is "
                                  "incomplete; latest still names the previous checkpoint)")
        done = len(list(folder.glob("rank_[0-9]*[0-9]")))
        if done == world_size:
            break
        if time.monotonic() > deadline:
            raise CheckpointError(f"{folder}: {done} of {world_size} ranks finished writing within "
                                  f"{timeout_s:.0f} s")
        time.sleep(poll_s)
    for marker in folder.iterdir():
        marker.unlink()
    folder.rmdir()


class Writer:
    """Runs each save's copy and writes inline (``background=False``) or in a thread, one save at a time."""

    def __init__(self, background: bool) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.buffers = HostBuffers()  # the host copies' memory, reused by every save of a background writer
        self._copied = threading.Event()  # set while no save's host copy is pending
        self._copied.set()
        self._copy_unwaited = False  # a save's copy started and no step has waited for it yet
        self._copy_waits: list[float] = []
        self._guarded: set[int] = set()  # id() of the optimizers whose step waits for the copy

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        """Make every ``optimizer.step()`` first wait for a pending host copy: the torch optimizer's step
        is where parameters, master weights and moments change (DeepSpeed's ZeRO 1/2 and bf16 wrappers
        write their low-precision copies of the parameters only after it). Once per optimizer."""
        if id(optimizer) not in self._guarded:
            self._guarded.add(id(optimizer))
            optimizer.register_step_pre_hook(lambda *_: self.wait_for_copy())

    def wait_for_copy(self) -> None:
        """Block until the pending save's host copy is done (its writes may go on). The first call
        after each save records how long it waited (0 when the copy was done)."""
        if not self._copy_unwaited:
            return
        self._copy_unwaited = False
        started = time.perf_counter()
        self._copied.wait()
        self._copy_waits.append(time.perf_counter() - started)

    def take_copy_waits(self) -> list[float]:
        """Seconds the first ``wait_for_copy`` after each save waited, since the last call (for the log)."""
        waits, self._copy_waits = self._copy_waits, []
        return waits

    def start(self, job: Callable[[], None], copy: Callable[[], None] | None = None) -> None:
        """Run ``copy`` (the host copy of one save, if deferred) and then ``job`` (its writes) after the
        previous save finished."""
        self.wait()
        copy = copy or (lambda: None)
        if not self.background:
            copy()
            job()
            return

        def run() -> None:
            try:
                try:
                    copy()
                finally:  # a failed copy must not hold the training loop: the error comes from wait()
                    self._copied.set()
                job()
            except BaseException as exc:  # noqa: BLE001  handed to the training loop by wait()
                self._error = exc
        self._copied.clear()
        self._copy_unwaited = True
        # A daemon: a rank that fails does not linger on its write (the save stays incomplete and
        # ``latest`` names the previous one); the training loop waits for it on every normal exit.
        self._thread = threading.Thread(target=run, name="megafim-checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the pending write (if any) is done; raise its error in the caller."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._copy_unwaited = False
        error, self._error = self._error, None
        if error is not None:
            raise error
