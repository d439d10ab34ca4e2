"""megafim.checkpoint.writer: host copies that ``torch.save`` writes byte for byte like the original,
completion markers, and a background writer that runs one save at a time and hands back its error."""

import io
import threading
import time
from collections import OrderedDict

import pytest
import torch

from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.writer import (COPY_DELAY_ENV, WRITERS_DIR, DeferredSaves, HostBuffers, Writer,
                                       host_copy, mark_done, wait_for_ranks, write_delay)


def saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def optimizer_like_state():
    """Views of one flat buffer (as ZeRO's partitions are), a Parameter, nested containers, non-tensors,
    and a tuple two param groups share (pickle writes a shared object once and refers back to it)."""
    flat, betas = torch.randn(20), (0.9, 0.95)
    master = torch.nn.Parameter(torch.randn(6))
    return flat, master, {"module": OrderedDict(w=flat[:12].view(3, 4), b=flat[12:]),
                          "optimizer": {"state": {0: {"exp_avg": torch.randn(6), "step": torch.tensor(3.0)}},
                                        "fp32": [master], "groups": [{"betas": betas, "params": [0]},
                                                   {"betas": betas, "params": [1]}]},
                          "shape": (torch.Size([3, 4]),), "name": "x", "none": None}


def test_host_copy_writes_the_same_bytes_and_is_independent():
    flat, master, state = optimizer_like_state()
    copied = host_copy(state)
    assert saved_bytes(copied) == saved_bytes(state)
    # shared storage stays shared (torch.save writes it once), types and flags are kept
    assert copied["module"]["w"].untyped_storage().data_ptr() == copied["module"]["b"].untyped_storage().data_ptr()
    assert type(copied["module"]) is OrderedDict and type(copied["optimizer"]["fp32"][0]) is torch.nn.Parameter
    assert copied["optimizer"]["fp32"][0].requires_grad
    before = saved_bytes(copied)
    with torch.no_grad():  # the next training step changes the live state, never the copy
        flat.add_(1.0)
        master.mul_(2.0)
    state["optimizer"]["state"][0]["exp_avg"].zero_()
    assert saved_bytes(copied) == before != saved_bytes(state)


def test_deferred_saves_write_later_what_the_real_engine_writes_now(tmp_path):
    class RealEngine:
        def __init__(self):
            self.calls = []

        def save(self, state_dict, path):
            torch.save(state_dict, path)

        def makedirs(self, path, exist_ok=False):
            self.calls.append(path)

    class DsEngine:
        checkpoint_engine = RealEngine()

    flat, _, state = optimizer_like_state()
    (tmp_path / "now").mkdir()
    (tmp_path / "later").mkdir()  # torch.save names its archive after the file: the same name in both
    torch.save(state, tmp_path / "now/state.pt")
    ds = DsEngine()
    real = ds.checkpoint_engine
    with DeferredSaves(ds) as deferred:
        ds.checkpoint_engine.makedirs("d")  # anything but save goes to the real engine
        ds.checkpoint_engine.save(state, str(tmp_path / "later/state.pt"))
    assert ds.checkpoint_engine is real and real.calls == ["d"]
    assert not (tmp_path / "later/state.pt").exists()
    flat.add_(1.0)
    deferred.write_all()
    assert (tmp_path / "later/state.pt").read_bytes() == (tmp_path / "now/state.pt").read_bytes()


def test_wait_for_ranks_waits_for_every_marker_then_removes_them(tmp_path):
    mark_done(tmp_path, 0)
    late = threading.Timer(0.3, mark_done, (tmp_path, 1))
    late.start()
    t0 = time.perf_counter()
    wait_for_ranks(tmp_path, 2, timeout_s=30)
    assert time.perf_counter() - t0 >= 0.25
    assert not (tmp_path / WRITERS_DIR).exists()  # the manifest lists no marker


def test_a_failed_rank_and_a_timeout_are_errors_naming_them(tmp_path):
    mark_done(tmp_path, 0)
    with pytest.raises(CheckpointError, match=r"1 of 2 ranks finished writing within"):
        wait_for_ranks(tmp_path, 2, timeout_s=0.2)
    mark_done(tmp_path, 1, OSError("No space left on device"))
    with pytest.raises(CheckpointError, match=r"rank_00001.failed: OSError: No space left on device"):
        wait_for_ranks(tmp_path, 2, timeout_s=30)


def test_background_writer_runs_one_save_at_a_time_and_reraises_its_error():
    writer, events = Writer(background=True), []
    gate = threading.Event()
    writer.start(lambda: (gate.wait(5), events.append("first")))
    assert writer.pending and events == []  # start returned before the write ran
    gate.set()
    writer.start(lambda: events.append("second"))  # waits for the first
    writer.wait()
    assert events == ["first", "second"] and not writer.pending

    def fail():
        raise OSError("disk full")
    writer.start(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()  # the error is raised once


def test_inline_writer_runs_at_once():
    events = []
    Writer(background=False).start(lambda: events.append(1))
    assert events == [1]


def test_write_delay_applies_to_its_step_only(monkeypatch):
    assert write_delay(4) == 0.0
    monkeypatch.setenv("MEGAFIM_CHECKPOINT_WRITE_DELAY", "4:2.5")
    assert write_delay(4) == 2.5 and write_delay(2) == 0.0


def test_host_buffers_are_reused_by_the_next_save_and_hold_its_values():
    flat, master, state = optimizer_like_state()
    buffers = HostBuffers()
    memo = buffers.start()
    first = host_copy(state, memo, buffers)
    slices = host_copy({"w": flat[:12].view(3, 4)}, memo, buffers)  # another copy in the same save
    buffers.finish()
    assert saved_bytes(first) == saved_bytes(state)
    ptr = first["module"]["w"].untyped_storage().data_ptr()
    assert slices["w"].untyped_storage().data_ptr() == ptr  # a storage is copied once per save
    with torch.no_grad():
        flat.add_(1.0)
    memo = buffers.start()
    second = host_copy(state, memo, buffers)
    buffers.finish()
    assert saved_bytes(second) == saved_bytes(state)
    assert second["module"]["w"].untyped_storage().data_ptr() == ptr  # the first save's buffer, refilled
    unused = torch.randn(4)
    third = host_copy({"other": unused}, buffers.start(), buffers)
    buffers.finish()  # the buffers of the state the third save did not copy are let go
    assert torch.equal(third["other"], unused) and buffers.start() == {}
    assert len(buffers._kept) == 1


def test_a_deferred_copy_takes_the_values_of_when_it_runs_and_writes_the_eager_copys_bytes():
    flat, master, state = optimizer_like_state()
    eager = host_copy(state, HostBuffers().start(), HostBuffers())
    buffers = HostBuffers()
    deferred = host_copy(state, buffers.start(deferred=True), buffers)
    buffers.finish()
    assert buffers._pending  # nothing copied yet; the storages are kept until the copy
    buffers.copy_pending()
    assert saved_bytes(deferred) == saved_bytes(eager) == saved_bytes(state) and not buffers._pending
    with torch.no_grad():
        flat.add_(1.0)
    assert saved_bytes(deferred) == saved_bytes(eager) != saved_bytes(state)


def _save_then_step(writer: Writer, delay_s: float):
    """A parameter and AdamW (stepping changes both); a deferred copy of both started in the writer's
    thread ``delay_s`` late; then a step. Returns (the copy, the values at the save, after the step)."""
    param = torch.nn.Parameter(torch.randn(8))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(8)
    optimizer.step()  # Adam's state exists
    writer.guard(optimizer)
    writer.guard(optimizer)  # once per optimizer
    state = {"param": param, "optimizer": optimizer.state_dict()}
    at_save = saved_bytes(state)
    copied = host_copy(state, writer.buffers.start(deferred=True), writer.buffers)
    writer.buffers.finish()
    writer.start(lambda: None, lambda: (time.sleep(delay_s), writer.buffers.copy_pending()))
    optimizer.step()  # the next training step
    return copied, at_save, saved_bytes(state)


def test_a_guarded_optimizer_step_waits_for_the_pending_copy():
    """Without the guard the step would change the state while the copy sleeps: the copy would hold
    the values after the step."""
    writer = Writer(background=True)
    copied, at_save, after_step = _save_then_step(writer, 0.5)
    waits = writer.take_copy_waits()
    writer.wait()
    assert saved_bytes(copied) == at_save != after_step
    assert len(waits) == 1 and waits[0] > 0.2 and writer.take_copy_waits() == []


def test_a_failed_copy_does_not_hold_the_step_and_is_raised_by_wait():
    writer = Writer(background=True)

    def fail():
        raise OSError("out of memory")
    writer.guard(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    writer.start(lambda: None, fail)
    writer.wait_for_copy()  # returns: the copy ended (with an error)
    with pytest.raises(OSError, match="out of memory"):
        writer.wait()


def test_copy_delay_is_read_from_its_own_variable(monkeypatch):
    monkeypatch.setenv(COPY_DELAY_ENV, "2:1.5")
    assert write_delay(2, COPY_DELAY_ENV) == 1.5 and write_delay(2) == 0.0
