"""torch.profiler around a range of training steps (Megatron's --profile-step-start/-end).

The chosen ranks record steps ``start..end`` (1-based, inclusive) and then write, under
``<dir>/rank<R>/``:
- ``trace.json``: a Chrome/Perfetto trace (chrome://tracing or ui.perfetto.dev), each step a span;
- ``ops.txt``: torch's table of operators, sorted by their own device time (CPU time on the CPU);
- ``ops.json``: the same as rows (name, calls, self CPU and device microseconds), for scripts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

TOP_OPS = 60


class StepProfiler:
    """``wrap(step)`` around each step; it starts and stops the profiler at the configured steps."""

    def __init__(self, start: int, end: int, out_dir: str | Path, rank: int, ranks: list[int],
                 report: Callable[[str], None] = print) -> None:
        """``report`` gets one line saying where the files went (the trainer's logger)."""
        self.start, self.end = start, max(end, start)
        self.rank = rank
        self.out = Path(out_dir) / f"rank{rank}"
        self.enabled = start > 0 and rank in ranks
        self.report = report
        self._prof: profile | None = None

    @contextlib.contextmanager
    def wrap(self, step: int):
        """Run step ``step`` (1-based) inside the profiler when it falls in the range."""
        if self.enabled and step == self.start:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities)
            self._prof.start()
        if self._prof is None:
            yield
            return
        with record_function(f"step {step}"):
            yield
        if step >= self.end:
            self.finish()

    def finish(self) -> None:
        """Stop and write the files (also when the run ends inside the range)."""
        if self._prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / "trace.json"))
        on_device = torch.cuda.is_available()
        sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
        events = prof.key_averages()
        (self.out / "ops.txt").write_text(events.table(sort_by=sort_by, row_limit=TOP_OPS) + "\n")
        rows = [{"name": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total,
                 "self_device_us": getattr(e, "self_device_time_total", 0.0)} for e in events]
        rows.sort(key=lambda r: r["self_device_us" if on_device else "self_cpu_us"], reverse=True)
        doc = {"steps": [self.start, self.end], "sorted_by": "self_device_us" if on_device else "self_cpu_us",
               "ops": rows[:TOP_OPS]}
        (self.out / "ops.json").write_text(json.dumps(doc, indent=1) + "\n")
        self.report(f"profile: steps {self.start}-{self.end} of rank {self.rank} written to {self.out} "
                    "(trace.json, ops.txt, ops.json)")
