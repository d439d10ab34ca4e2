"""Per-step metrics to the console, TensorBoard, Weights & Biases and ``<save>/metrics.jsonl`` (one JSON
object a line).

Only the logging rank (global rank 0 by default; with pipeline parallelism the loop passes the
metrics from the last stage to it) writes anything. ``metrics.jsonl`` is appended to, so a resumed
run continues the same file; scripts compare runs by reading it line by line.
"""

from __future__ import annotations

import json
import os
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class StepMetrics:
    """What one optimizer step reports (every field lands in metrics.jsonl)."""

    step: int
    """Optimizer steps completed after this one (1-based)."""
    loss: float
    """Total loss: the sum over heads of each head's mean cross-entropy."""
    head_losses: list = field(default_factory=list)
    """Each head's mean cross-entropy (head 1 predicts the next token)."""
    lr: float = 0.0
    """Learning rate used by this step."""
    grad_norm: float = 0.0
    """Global gradient norm before clipping (NaN when the step was skipped)."""
    tokens_per_s: float = 0.0
    """Training tokens (global batch x seq length) of this step divided by its wall time."""
    mfu: float | None = None
    """Model FLOPs utilization (fraction of the peak), when the peak is known."""
    memory_gib: float | None = None
    """Peak accelerator memory allocated on the logging rank, GiB (None on the CPU)."""
    step_time_s: float = 0.0
    """Wall time of this step."""
    consumed_samples: int = 0
    """Training samples consumed so far."""
    skipped: bool = False
    """True when the loss was NaN/inf and the update was skipped."""
    valid_loss: float | None = None
    """Validation loss after this step, on the steps that evaluate (``schedule.eval_interval``)."""
    valid_head_losses: list | None = None
    """Each head's validation loss, with ``valid_loss``."""

    def as_json(self) -> dict:
        out = {"step": self.step, "loss": _num(self.loss)}
        for i, h in enumerate(self.head_losses):
            out[f"loss_head_{i + 1}"] = _num(h)
        out.update(lr=self.lr, grad_norm=_num(self.grad_norm), tokens_per_s=round(self.tokens_per_s, 2),
                   mfu=self.mfu, memory_gib=self.memory_gib, step_time_s=round(self.step_time_s, 4),
                   consumed_samples=self.consumed_samples, skipped=self.skipped)
        if self.valid_loss is not None:
            out["valid_loss"] = _num(self.valid_loss)
            for i, h in enumerate(self.valid_head_losses or []):
                out[f"valid_loss_head_{i + 1}"] = _num(h)
        return out


def drop_lines_after(path: Path, step: int) -> None:
    """Keep only the lines of ``path`` whose step is <= ``step`` (atomically; a no-op when none is later)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def scalar_tags(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl record as TensorBoard / W&B tags: ``train/<key>``, and
    ``valid/<rest>`` for ``valid_<rest>``. Left out: the step (the x axis), ``skipped`` (a flag) and
    what is not a finite number (NaN/inf are strings in the record; MFU and memory may be None)."""
    tags = {}
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"valid/{key[len('valid_'):]}" if key.startswith("valid_") else f"train/{key}"] = value
    return tags


def _num(x: float) -> float | str:
    """JSON has no NaN/inf: write them as strings so every line stays valid JSON."""
    return x if math.isfinite(x) else str(x)


def model_flops_per_token(n_nonembed_params: int, n_layers: int, hidden: int, seq_length: int) -> float:
    """Training FLOPs per token: 6 x non-embedding params (incl. unembedding) + 12 x layers x hidden x seq
    (attention), the accounting the issue's MFU uses."""
    return 6.0 * n_nonembed_params + 12.0 * n_layers * hidden * seq_length


def default_peak_flops() -> float:
    """A guess at one accelerator's dense bf16 peak (FLOP/s); 0 when unknown (MFU not shown)."""
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0)):
        if key in name:
            return tflops * 1e12
    return 0.0


class MetricsLogger:
    """Console lines, an optional progress bar, TensorBoard scalars, W&B scalars and metrics.jsonl."""

    def __init__(self, save_dir: str, total_steps: int, *, enabled: bool, log_interval: int = 1,
                 tensorboard: bool = True, progress_bar: str = "auto", start_step: int = 0, wandb=None):
        """``start_step``: the step a resume starts from; lines of later steps in an existing
        metrics.jsonl (a run that went on past its last checkpoint) are dropped, so that every step
        appears once. ``wandb``: an open ``WandbRun`` (the logging rank's) or None."""
        self.enabled = enabled
        self.log_interval = log_interval
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.wandb = wandb
        if not enabled:
            return
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            path = Path(save_dir) / "metrics.jsonl"
            drop_lines_after(path, start_step)
            self.jsonl = open(path, "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(save_dir) / "tensorboard"))
        if progress_bar == "on" or (progress_bar == "auto" and sys.stdout.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, m: StepMetrics) -> None:
        if not self.enabled:
            return
        record = m.as_json()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        tags = scalar_tags(record)
        if self.tb is not None:
            for tag, value in tags.items():
                self.tb.add_scalar(tag, value, m.step)
        if self.wandb is not None:
            self.wandb.log(tags, m.step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m.loss:.4f}", lr=f"{m.lr:.2e}", tok_s=f"{m.tokens_per_s:.0f}")
        elif m.step % self.log_interval == 0 or m.skipped:
            self.info(console_line(m))

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, exit_code: int = 0) -> None:
        """``exit_code``: the trainer's (1 when it raised); W&B records it, a non-zero one as failed."""
        if self.wandb is not None:
            self.wandb.close(exit_code)
        for handle in (self.jsonl, self.tb, self.bar):
            if handle is not None:
                handle.close()
        self.jsonl = self.tb = self.bar = self.wandb = None


def validation_line(step: int, losses, seconds: float) -> str:
    """``losses``: [total, head 1, ..., head n]; the perplexity is head 1's (next-token) one."""
    heads = " ".join(f"{float(h):.4f}" for h in losses[1:])
    ppl = math.exp(min(float(losses[1]), 50.0))
    return (f"validation at step {step} | loss {float(losses[0]):.4f} | heads [{heads}] | "
            f"next-token ppl {ppl:.2f} | {seconds:.1f} s")


def console_line(m: StepMetrics) -> str:
    heads = " ".join(f"{h:.4f}" for h in m.head_losses)
    parts = [f"step {m.step:6d}", f"loss {m.loss:.4f}", f"heads [{heads}]", f"lr {m.lr:.3e}",
             f"grad_norm {m.grad_norm:.3f}", f"tok/s {m.tokens_per_s:,.0f}"]
    if m.mfu is not None:
        parts.append(f"mfu {100 * m.mfu:.1f}%")
    if m.memory_gib is not None:
        parts.append(f"mem {m.memory_gib:.2f} GiB")
    if m.skipped:
        parts.append("SKIPPED (non-finite loss)")
    return " | ".join(parts)
