"""torchrun worker for test_deepspeed_zero.py: multi_token_loss under DeepSpeed ZeRO stages 0-3.

Each rank feeds its own micro-batch through a tiny trunk + n heads model; after ONE
``engine.backward(loss)`` every parameter's full gradient (gathered with ``safe_get_full_grad``) must
equal plain torch's gradient of the mean of the ranks' losses. Run as:
    torchrun --standalone --nproc_per_node=2 tests/ops/zero_worker.py --stages 0 1 2 3 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import deepspeed
import deepspeed.ops
from deepspeed.utils import safe_get_full_grad
from megafim.ops.multi_token_loss import multi_token_loss
from megafim.parallel.zero3 import Zero3Params

DIM, HIDDEN, VOCAB, N_HEADS, BATCH, SEQ = 8, 12, 29, 3, 2, 6


class Block(nn.Module):
    """One head: a residual MLP (a module, so that ZeRO-3 gathers its parameters when it runs)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        return x + self.down(F.silu(self.up(x)))


class TinyMTP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.trunk = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(N_HEADS))
        self.norm = nn.RMSNorm(DIM, eps=1e-6)  # shared by every head
        self.unembed = nn.Linear(DIM, VOCAB, bias=False)
        with torch.no_grad():
            self.norm.weight.add_(0.1 * torch.randn(DIM))

    def head_params(self):
        return [*self.blocks.parameters(), *self.norm.parameters()]

    def forward(self, x, labels, mask):
        hidden = torch.tanh(self.trunk(x))  # (B, T, d)
        heads = [lambda h, b=b: self.norm(b(h)) for b in self.blocks]
        loss, _ = multi_token_loss(hidden, heads, self.head_params(), self.unembed.weight, labels, mask,
                                   impl="torch", chunk_size=5, partitioned=Zero3Params)
        return loss


def batch_for(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(BATCH, SEQ, DIM, generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.rand(BATCH, SEQ, generator=gen).round()
    mask[:, 0] = 1.0
    return x, labels, mask


def reference(world: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Plain torch, all heads materialised, full logits: the gradient of the mean over the ranks'
    losses, and each rank's loss."""
    model = TinyMTP()
    total, losses = 0, []
    for rank in range(world):
        x, labels, mask = batch_for(rank)
        hidden = torch.tanh(model.trunk(x))
        loss = 0
        for k, block in enumerate(model.blocks):
            logits = model.unembed(model.norm(block(hidden)))[:, : SEQ - k]
            ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, k:].reshape(-1), reduction="none")
            m = mask[:, k:].reshape(-1)
            loss = loss + (ce * m).sum() / m.sum()
        total = total + loss / world
        losses.append(loss.item())
    total.backward()
    return {name: p.grad for name, p in model.named_parameters()}, losses


def run_stage(stage: int, rank: int, world: int, persistence: int | None) -> dict:
    model = TinyMTP()
    zero = {"stage": stage}
    if stage == 3 and persistence is not None:
        zero["stage3_param_persistence_threshold"] = persistence
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x, labels, mask = batch_for(rank)
    expected, ref_losses = reference(world)
    errors: dict = {}
    # Two micro-steps (lr 0 keeps the weights): the second proves no gathered or stale state is left.
    for _ in range(2):
        loss = engine(x, labels, mask)
        errors["train loss"] = max(abs(loss.item() - ref_losses[rank]) / ref_losses[rank],
                                   errors.get("train loss", 0.0))
        engine.backward(loss)
        for name, param in engine.module.named_parameters():
            grad = safe_get_full_grad(param)
            if grad is None:
                errors[name] = "missing"
                continue
            ref = expected[name]
            err = ((grad.reshape(ref.shape) - ref).abs().max() / ref.abs().max()).item()
            errors[name] = max(err, errors.get(name, 0.0))
        engine.step()
    if stage == 3:  # everything the loss gathered is partitioned again after the step
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        left = [name for name, p in engine.module.named_parameters()
                if not p.ds_persist and p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
        errors["params left gathered"] = len(left)
        if left:
            errors["params left gathered: names"] = left
    # Evaluation takes the losses-only path (under ZeRO-3 it gathers W and releases it). Checked after
    # the count above: ZeRO-3's own prefetcher may leave the trace's first modules gathered after a
    # no_grad forward (here trunk and blocks.0), which is not this loss's doing.
    with torch.no_grad():
        errors["eval loss"] = abs(engine(x, labels, mask).item() - ref_losses[rank]) / ref_losses[rank]
    engine.destroy() if hasattr(engine, "destroy") else None
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # The shm all-reduce op would be JIT-compiled (~40 s) on first use; gloo is all these tests need.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    # Stage 3 twice: with DeepSpeed's default persistence threshold (these tiny parameters stay
    # gathered) and with 0, which partitions every parameter as for a real model's large ones.
    runs = [(s, None) for s in args.stages] + ([(3, 0)] if 3 in args.stages else [])
    for stage, persistence in runs:
        key = str(stage) if persistence is None else f"{stage}/persistence={persistence}"
        try:
            results[key] = run_stage(stage, rank, world, persistence)
        except Exception as exc:  # reported per stage so that one failure does not hide the others
            results[key] = {"exception": f"{type(exc).__name__}: {exc}", "where": traceback.format_exc()}
    (args.out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    # Skip the interpreter's teardown, as megafim.train does (docs/platform_notes.md, "Exit").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
