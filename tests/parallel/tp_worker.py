"""torchrun worker: tensor-parallel GPT vs the same model at tp = 1, loss and every gradient.

Usage: torchrun --standalone --nproc_per_node=N tests/parallel/tp_worker.py CASE [CASE ...]
with CASE = "tp=<t>,dp=<d>,n_future=<n>,sp=<0|1>[,ckpt=1][,bias=1][,tie=1]" (bias: q/k/v biases,
tie: tied embeddings), "zero=<stage>" (DeepSpeed with the mpu, N = 2)
or "build=<tp>" (the trainer's meta-device stage build against the whole seeded model).
Every rank builds the full model from one seed, runs it unsharded as the reference, then shards a
copy and compares; gradients of sharded parameters are all-gathered back to full shape along their
``partition_dim``. Prints "OK <case> ..." per case on rank 0 and exits non-zero on any mismatch.
"""

import copy
import os
import sys
import traceback

import torch
import torch.distributed as dist

from megafim.model import GPT, model_config
from megafim.parallel import DeepSpeedMPU, ParallelDims, apply_tensor_parallel
from megafim.training.build import build_stage, plan_stages
from megafim.training.distributed import WorldInfo, init_distributed

RTOL, ATOL = 1e-4, 1e-6  # fp32; observed differences are ~1e-7 relative (summation order only)


def full_grad(param, group, tp):
    """The parameter's gradient at its full (tp = 1) shape."""
    if not getattr(param, "tensor_model_parallel", False):
        return param.grad
    parts = [torch.empty_like(param.grad) for _ in range(tp)]
    dist.all_gather(parts, param.grad.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def parse(case):
    fields = dict(item.split("=") for item in case.split(","))
    return (int(fields["tp"]), int(fields["dp"]), int(fields["n_future"]), bool(int(fields["sp"])),
            *(bool(int(fields.get(key, "0"))) for key in ("ckpt", "bias", "tie")))


def run_case(case):
    tp, dp, n_future, sp, ckpt, bias, tie = parse(case)
    dims = ParallelDims.build(tp=tp, pp=1, dp=dp)
    check_mpu(dims)
    check_mappings(dims)
    torch.manual_seed(0)
    # activation checkpointing recomputes blocks, collectives included, in the backward pass
    reference = GPT(model_config("tiny", n_future=n_future, n_layers=3, activation_checkpointing=ckpt,
                                 qkv_bias=bias, tie_embeddings=tie))
    with torch.no_grad():  # non-trivial norm gains and biases so their gradients matter
        for name, p in reference.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    parallel = apply_tensor_parallel(copy.deepcopy(reference), dims, sequence_parallel=sp)

    g = torch.Generator().manual_seed(1)
    seq = 16
    tokens = torch.randint(0, 512, (2, seq + 1), generator=g)
    loss_mask = (torch.rand(2, seq, generator=g) > 0.25).float()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    ref_out = reference(inputs, labels, loss_mask)
    ref_out.loss.backward()
    out = parallel(inputs, labels, loss_mask)
    out.loss.backward()

    torch.testing.assert_close(out.loss, ref_out.loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.head_losses, ref_out.head_losses, rtol=RTOL, atol=ATOL)
    ref_params = dict(reference.named_parameters())
    names = [n for n, _ in parallel.named_parameters()]
    assert sorted(names) == sorted(ref_params), "parameter names changed under tensor parallelism"
    assert (parallel.lm_head.weight is parallel.embed_tokens.weight) == tie
    worst = 0.0
    for name, param in parallel.named_parameters():
        grad = full_grad(param, dims.tp_group, tp)
        torch.testing.assert_close(grad, ref_params[name].grad, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{name}: {m}")
        worst = max(worst, (grad - ref_params[name].grad).abs().max().item())
    with torch.no_grad():  # inference path: gathered logits
        torch.testing.assert_close(parallel.logits(inputs), reference.logits(inputs), rtol=RTOL, atol=1e-5)
    if dims.rank == 0:
        print(f"OK {case} loss={out.loss.item():.6f} max_grad_diff={worst:.2e} params={len(names)}",
              flush=True)


def check_deepspeed(case):
    """DeepSpeed with DeepSpeedMPU over tp = 2 (sequence parallel): its global gradient norm must equal
    the tp = 1 norm, which holds only if the mpu's groups and the shards' ``tensor_model_parallel``
    marks are right (replicated parameters counted once, shards summed over the model group)."""
    stage = int(case.split("=")[1])
    dims = ParallelDims.build(tp=2)
    import deepspeed

    torch.manual_seed(0)
    reference = GPT(model_config("tiny", n_future=2, n_layers=3))
    model = apply_tensor_parallel(copy.deepcopy(reference), dims, sequence_parallel=True)
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    reference(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters())).item()
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1e9,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config, mpu=DeepSpeedMPU(dims))
    out = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(out.loss)
    engine.step()
    norm = float(engine.get_global_grad_norm())
    if abs(norm - expected) > 1e-4 * expected:
        raise AssertionError(f"ZeRO-{stage}: DeepSpeed's gradient norm {norm} != tp=1 norm {expected}")
    if dims.rank == 0:
        print(f"OK {case} grad_norm={norm:.6f} expected={expected:.6f}", flush=True)


def check_build(case):
    """build_stage makes each stage of a pp = 2 layout on the meta device, shards it and only then makes
    its weights: this rank's tensors must be exactly its slices of ``torch.manual_seed(s); GPT(mc)``."""
    dims = ParallelDims.build(tp=int(case.split("=")[1]))
    mc = model_config("tiny", n_future=2, n_layers=5)
    torch.manual_seed(11)
    whole = dict(GPT(mc).named_parameters())
    seen = set()
    for plan in plan_stages(mc.n_trunk_layers, mc.n_future, 2):
        stage = build_stage(mc, plan, 11, dims)
        for name, param in stage.model.named_parameters():
            expected = whole[name].detach()
            if getattr(param, "tensor_model_parallel", False):
                expected = expected.chunk(dims.tp, dim=param.partition_dim)[dims.tp_rank]
            if param.is_meta or not torch.equal(param.detach(), expected):
                raise AssertionError(f"build_stage: {name} is not this rank's slice of the seeded model")
            seen.add(name)
    assert seen == set(whole), sorted(set(whole) - seen)[:3]
    if dims.rank == 0:
        print(f"OK {case} params={len(seen)}", flush=True)


def check_mappings(dims):
    """Each public wrapper's forward and backward against the collective its docstring names."""
    from megafim.parallel import mappings as m

    group, tp, r = dims.tp_group, dims.tp, dims.tp_rank
    x = torch.arange(2 * 4 * 8, dtype=torch.float32).view(2, 4, 8) + 100 * dims.rank  # differs per rank
    everyone = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(everyone, x, group=group)
    total = sum(everyone)
    forwards = {  # wrapper: its expected forward output
        m.copy_to_tensor_parallel: x,
        m.reduce_from_tensor_parallel: total,
        m.scatter_to_tensor_parallel: x.chunk(tp, -1)[r],
        m.gather_from_tensor_parallel: torch.cat(everyone, -1),
        m.scatter_to_sequence_parallel: x.chunk(tp, 1)[r],
        m.gather_from_sequence_parallel: torch.cat(everyone, 1),
        m.reduce_scatter_to_sequence_parallel: total.chunk(tp, 1)[r],
        m.all_gather_sequence_for_tensor_parallel: torch.cat(everyone, 1),
    }
    for fn, expected in forwards.items():
        inp = x.clone().requires_grad_(True)
        out = fn(inp, group)
        torch.testing.assert_close(out, expected, msg=lambda msg: f"{fn.__name__} forward: {msg}")
        upstream = torch.arange(out.numel(), dtype=torch.float32).view(out.shape) + 1000 * dims.rank
        out.backward(upstream)
        ups = [torch.empty_like(upstream) for _ in range(tp)]
        dist.all_gather(ups, upstream, group=group)
        conjugates = {  # what the backward must compute from the upstream gradients of all ranks
            "copy_to_tensor_parallel": lambda: sum(ups),
            "reduce_from_tensor_parallel": lambda: upstream,
            "scatter_to_tensor_parallel": lambda: torch.cat(ups, -1),
            "gather_from_tensor_parallel": lambda: upstream.chunk(tp, -1)[r],
            "scatter_to_sequence_parallel": lambda: torch.cat(ups, 1),
            "gather_from_sequence_parallel": lambda: upstream.chunk(tp, 1)[r],
            "reduce_scatter_to_sequence_parallel": lambda: torch.cat(ups, 1),
            "all_gather_sequence_for_tensor_parallel": lambda: sum(ups).chunk(tp, 1)[r],
        }
        conjugate = conjugates[fn.__name__]()
        torch.testing.assert_close(inp.grad, conjugate, msg=lambda msg: f"{fn.__name__} backward: {msg}")
    # a sequence that does not split evenly is refused on every rank alike, before any collective
    for fn in (m.scatter_to_sequence_parallel, m.reduce_scatter_to_sequence_parallel):
        try:
            fn(torch.zeros(2, 4 * tp + 1, 8), group)
        except ValueError as exc:
            assert "multiple of the tensor-parallel size" in str(exc), exc
        else:
            raise AssertionError(f"{fn.__name__} accepted a sequence of {4 * tp + 1} over {tp} ranks")


def check_mpu(dims):
    mpu = DeepSpeedMPU(dims)
    tp_group = mpu.get_tensor_model_parallel_group()
    assert mpu.get_tensor_model_parallel_world_size() == dist.get_world_size(tp_group)
    assert mpu.get_data_parallel_world_size() == dist.get_world_size(mpu.get_data_parallel_group())
    assert mpu.get_tensor_model_parallel_rank() == dist.get_rank(mpu.get_tensor_model_parallel_group())
    assert mpu.get_data_parallel_rank() == dist.get_rank(mpu.get_data_parallel_group())
    assert mpu.get_model_parallel_world_size() == dist.get_world_size(mpu.get_model_parallel_group())
    assert dims.rank in mpu.get_data_parallel_group_ranks()
    assert mpu.get_tensor_model_parallel_src_rank() == dims.rank - dims.tp_rank  # tp ranks are consecutive


def main():
    cases = sys.argv[1:]
    if any(case.startswith("zero=") for case in cases):
        # the trainer's start-up: DeepSpeed's comm backend over gloo, without JIT-building its shm op
        init_distributed(WorldInfo.from_env(), "gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for case in cases:
            if case.startswith("zero="):
                check_deepspeed(case)
            elif case.startswith("build="):
                check_build(case)
            else:
                run_case(case)
    except BaseException:
        # The other ranks may wait in a collective this rank will never join: exit now, torchrun
        # then stops them, instead of a barrier that would hang.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
