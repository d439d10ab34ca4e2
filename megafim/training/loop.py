"""The training loop: set-up, one optimizer step (1F1B over the micro-batches), validation, saves, stop rules.

Order of set-up (errors surface before any expensive or collective work):
config checks -> tokenizer and model shape checks -> process groups -> this rank's stage, tensor-
parallel, its weights made one full tensor at a time and sliced (initialised from the seed, or read
from a checkpoint of another layout) -> DeepSpeed -> resume (same layout: DeepSpeed state) -> dataset
(index built by rank 0, barrier, the others map it) -> RNG states restored last, so nothing in set-up
disturbs them.
"""

from __future__ import annotations

import logging
import random
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megafim.model import ModelConfig
from megafim.model.documents import Documents, token_layout
from megafim.parallel.context_parallel import gathered_positions, local_positions
from megafim.parallel import DeepSpeedMPU, ParallelDims
from megafim.parallel.zero3 import apply_zero3
from megafim.checkpoint import engine as ckpt_engine
from megafim.checkpoint.state import TrainerState, load_rng
from megafim.checkpoint.writer import Writer
from megafim.checkpoint.weights import full_weights
from megafim.training.build import (PipelineStage, StagePlan, build_stage, build_train_valid_datasets,
                                    checked_data_config, plan_stages)
from megafim.training.checkpoint_resume import (inherit_special_tokens, load_engine_state, load_resharded_state,
                                                 resume_point)
from megafim.training.cli import dump_yaml
from megafim.training.config import (ConfigError, TrainConfig, grad_accumulation_steps, lr_at,
                                     resolve_model_config, validate)
from megafim.training.deepspeed_config import effective_deepspeed_config, resolve_precision, write_and_describe
from megafim.training.distributed import WorldInfo, init_distributed, shutdown
from megafim.training.metrics import (MetricsLogger, StepMetrics, default_peak_flops, model_flops_per_token,
                                      validation_line)
from megafim.training.optim import build_optimizer
from megafim.training.pipeline import StageComm, run_1f1b
from megafim.training.profiling import StepProfiler
from megafim.training.sampler import MicroBatches, ResumableSampler
from megafim.training.signals import StopRequest
from megafim.training.wandb_logger import WandbRun

EXIT_OK, EXIT_RAISED, EXIT_NONFINITE = 0, 1, 3  # 1: what Python exits with on an exception


@dataclass
class Run:
    """Everything one rank's loop needs, built once by ``setup``."""

    cfg: TrainConfig
    mc: ModelConfig
    dims: ParallelDims
    device: torch.device
    plan: StagePlan
    stage: PipelineStage
    engine: object
    optimizer: object
    comm: StageComm
    gas: int
    state: TrainerState
    log: MetricsLogger


def check_before_groups(cfg: TrainConfig, world_size: int):
    """All checks that need no process group, cheapest first; returns (tokenizer, model config, notes
    for the log)."""
    validate(cfg, world_size)
    if not cfg.data.tokenizer_model:
        raise ConfigError("data.tokenizer_model is required (--tokenizer-model FILE.model)")
    if not cfg.data.data_path:
        raise ConfigError("data.data_path is required (--data-path PREFIX [PREFIX ...])")
    checked_data_config(cfg)  # a wrong path fails here, before the model and DeepSpeed are built
    if cfg.parallel.pipeline > 1 and cfg.parallel.zero_stage == 3:
        raise ConfigError("parallel.zero_stage = 3 with parallel.pipeline > 1 is not supported: ZeRO-3 checks "
                          "that every rank ran the same modules, which pipeline stages never do. Use ZeRO 0-2 "
                          "with pipeline parallelism (docs/training.md)")
    from megafim.data.fim import split_token_id
    from megafim.data.tokenizer import load_tokenizer, require_fim
    from megafim.data.tokenizer_hf import NoEndOfTextError

    notes: list[str] = []
    inherit_special_tokens(cfg, notes)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type or None,
                                   dict(cfg.data.special_tokens) or None)
    except NoEndOfTextError as exc:
        how = "data.special_tokens, e.g. --set 'data.special_tokens={eod: \"<|eot_id|>\"}'"
        raise ConfigError(f"data.tokenizer_model: cannot load {cfg.data.tokenizer_model}: "
                          f"{exc.naming(how)}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"data.tokenizer_model: cannot load {cfg.data.tokenizer_model}: {exc}") from None
    if cfg.data.fim.rate > 0:
        try:
            require_fim(tokenizer)
        except ValueError as exc:
            raise ConfigError(f"data.fim.rate {cfg.data.fim.rate}: {exc}") from None
    try:
        split_token_id(cfg.data.fim, tokenizer)
    except ValueError as exc:
        detail = str(exc).removeprefix("FimConfig.split_token ")
        raise ConfigError(f"data.fim.split_token (--fim-split-token): {detail}") from None
    mc = resolve_model_config(cfg, tokenizer.vocab_size, notes)
    validate(cfg, world_size, mc)
    return tokenizer, mc, notes


class _KnownDeepSpeedWarnings(logging.Filter):
    """Drops DeepSpeed's "untested optimizer" warning: our torch AdamW is what the generated config
    allows on purpose (``zero_allow_untested_optimizer``), and its gradients are tested under ZeRO 0-3
    (tests/ops/test_deepspeed_zero.py). Every other warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def _quiet_deepspeed() -> None:
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _KnownDeepSpeedWarnings) for f in ds_logger.filters):
        ds_logger.addFilter(_KnownDeepSpeedWarnings())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: TrainConfig) -> tuple[Run, object, object]:
    """Build everything for this rank; returns the run, the training dataset and the validation
    dataset (None unless ``schedule.eval_interval`` is set)."""
    import deepspeed

    info = WorldInfo.from_env()
    tokenizer, mc, notes = check_before_groups(cfg, info.world_size)
    device = init_distributed(info, cfg.parallel.backend, cfg.parallel.distributed_timeout_minutes)
    _quiet_deepspeed()
    dims = ParallelDims.build(tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline, cp=cfg.parallel.context)
    gas = grad_accumulation_steps(cfg, info.world_size)
    ds_config = effective_deepspeed_config(cfg, info.world_size)
    resume = resume_point(cfg, dims, mc)
    ckpt, saved, same_layout = resume.ckpt, resume.state, resume.same_layout
    log = MetricsLogger(cfg.checkpoint.save, cfg.schedule.train_iters, enabled=dims.rank == 0,
                        log_interval=cfg.logging.log_interval, tensorboard=cfg.logging.tensorboard,
                        progress_bar=cfg.logging.progress_bar, start_step=saved.step if saved else 0,
                        wandb=WandbRun.open(cfg, saved is not None) if dims.rank == 0 else None)
    log.info(f"megafim: {info.world_size} ranks = tp {dims.tp} x cp {dims.cp} x pp {dims.pp} x dp {dims.dp}, ZeRO-"
             f"{cfg.parallel.zero_stage}, {resolve_precision(cfg)}, {gas} micro-batches/step, device {device}")
    log.info(f"model: {mc}")
    for note in notes:
        log.info(note)
    log.info(write_and_describe(ds_config, cfg.checkpoint.save if dims.rank == 0 else ""))
    for note in resume.notes:
        log.info(note)

    _seed_everything(cfg.schedule.seed)
    plan = plan_stages(mc.n_trunk_layers, mc.n_future, dims.pp)[dims.pp_rank]
    weights = None
    if ckpt is not None and not same_layout:
        log.info(f"resume: {ckpt} was saved with layout {saved.layout}, this run is "
                 f"{ckpt_engine.layout_of(dims, cfg.parallel.zero_stage)}: loading its layout-free weights "
                 "and resharding them, and the optimizer state from its layout-free optim/")
        weights = full_weights(ckpt)
    stage = build_stage(mc, plan, cfg.schedule.seed, dims, weights, cfg.parallel.sequence_parallel)
    stage.to(device)
    if cfg.parallel.zero_stage == 3:
        apply_zero3(stage.model)
    if cfg.model.compile:
        stage.model.compile_blocks()
        log.info("model: transformer blocks compiled with torch.compile (the first steps include compiling)")
    optimizer = build_optimizer(stage, cfg.optimizer)
    engine, *_ = deepspeed.initialize(model=stage, optimizer=optimizer, config=ds_config, mpu=DeepSpeedMPU(dims))
    ckpt_engine.name_checkpoint_files(engine, dims)
    state = TrainerState(layout=ckpt_engine.layout_of(dims, cfg.parallel.zero_stage))
    if ckpt is not None:
        if same_layout:
            load_engine_state(ckpt, engine)
        elif load_resharded_state(ckpt, engine, stage, dims, saved) is None:
            log.info(f"resume: {ckpt} holds no optimizer state (optim/): the optimizer starts fresh")
        state = TrainerState(step=saved.step, consumed_samples=saved.consumed_samples, epoch=saved.epoch,
                                layout=state.layout)
        log.info(f"resume: from {ckpt} at step {state.step}, {state.consumed_samples} samples consumed")
    dataset, valid = _datasets(cfg, tokenizer, dims)
    if ckpt is not None and same_layout and not load_rng(ckpt, dims.rank):
        log.info(f"resume: {ckpt} has no RNG state for rank {dims.rank}; continuing with the seeded state")
    dtype = torch.bfloat16 if resolve_precision(cfg) == "bf16" else torch.float32
    # Between stages each rank sends its own part of the sequence (context, then sequence parallel).
    local_seq = cfg.data.seq_length // dims.cp // (dims.tp if cfg.parallel.sequence_parallel else 1)
    comm = _stage_comm(dims, plan, (cfg.batch.micro_batch_size, local_seq, mc.hidden_size), dtype, device)
    return Run(cfg, mc, dims, device, plan, stage, engine, optimizer, comm, gas, state, log), dataset, valid


def _datasets(cfg: TrainConfig, tokenizer, dims: ParallelDims):
    """(train, valid or None). Rank 0 builds (and caches) the sample indices, then the others map the
    finished caches."""
    n_train = cfg.schedule.train_iters * cfg.batch.global_batch_size
    n_valid = cfg.schedule.eval_iters * cfg.batch.global_batch_size if cfg.schedule.eval_interval else 0
    if dims.rank == 0:
        build_train_valid_datasets(cfg, tokenizer, n_train, n_valid, is_builder=True)
    dist.barrier()
    return build_train_valid_datasets(cfg, tokenizer, n_train, n_valid, is_builder=dims.rank == 0)


def _stage_comm(dims: ParallelDims, plan: StagePlan, shape, dtype, device) -> StageComm:
    ranks = dims.ranks("pp")  # this rank's pipeline, stage order
    prev_rank = None if plan.is_first else ranks[dims.pp_rank - 1]
    next_rank = None if plan.is_last else ranks[dims.pp_rank + 1]
    return StageComm(dims.pp_rank, dims.pp, prev_rank, next_rank, shape, dtype, device)


# --------------------------------------------------------------------------------------------
# One optimizer step.


def train_step(run: Run, batches: list[dict]) -> tuple[torch.Tensor, bool, float]:
    """Forward/backward every micro-batch in 1F1B order and apply (or skip) the update.

    Returns (the stats vector [loss, head losses..., non-finite count] averaged over the global batch
    and summed over ranks, identical on every rank; whether the update was skipped; the global
    gradient norm before clipping)."""
    engine, plan, gas, dev = run.engine, run.plan, run.gas, run.device
    n_heads = run.mc.n_future
    sums = torch.zeros(n_heads + 2, dtype=torch.float64, device=dev)  # loss, heads..., non-finite

    def forward(i: int, received):
        output = _stage_forward(run, batches[i], received)
        if not plan.is_last:
            return output
        loss, head_losses = output
        # Counted on the device: a host-side test here would wait for every forward to finish before
        # its backward could be queued.
        value = loss.detach().double()
        finite = torch.isfinite(value)
        sums[0] += torch.where(finite, value, 0.0)
        sums[1:-1] += torch.where(finite, head_losses.detach().double(), 0.0)
        sums[-1] += (~finite).double()
        return loss

    def backward(output, grad):
        if grad is None:
            engine.backward(output)
        else:  # d/d output of (output * grad).sum() is exactly grad
            engine.backward((output * grad).sum(), scale_wrt_gas=False)

    def after_backward(i: int):
        if i < gas - 1:  # the boundary step waits until every rank knows whether to skip it
            engine.step()

    run_1f1b(run.comm, gas, forward, backward, after_backward)
    _sum_over_ranks(run, sums)  # averaged over dp x micro-batches below
    nonfinite = bool(sums[-1] > 0)
    if nonfinite:
        run.optimizer.skip_next_step()
    own_norm = _grad_norm_before_step(run) if _deepspeed_keeps_no_norm(run) else None
    before = engine.skipped_steps
    engine.step()
    run.optimizer.end_step()
    # ZeRO-1/2 also skip a step by themselves when a gradient overflows while the loss is finite; their
    # overflow flag is reduced over the data- and model-parallel groups, so every rank agrees.
    skipped = nonfinite or engine.skipped_steps > before
    finite = run.dims.dp * run.dims.cp * gas - sums[-1]
    sums[:-1] /= torch.clamp(finite, min=1)
    if nonfinite:  # say so rather than average the finite micro-batches
        sums[:-1] = float("nan")
    return sums.cpu(), skipped, own_norm if own_norm is not None else _grad_norm(engine)


@torch.no_grad()
def evaluate(run: Run, valid) -> torch.Tensor:
    """The validation loss: the first ``eval_iters`` global batches of the validation split (the same
    every time), forward only, micro-batch by micro-batch through the pipeline stages. Returns
    [loss, head losses...] averaged over all those micro-batches, identical on every rank."""
    comm = run.comm
    batches = MicroBatches(valid, ResumableSampler(len(valid), run.cfg.batch.micro_batch_size,
                                                   run.dims.dp_rank, run.dims.dp))
    n_micro = run.cfg.schedule.eval_iters * run.gas
    sums = torch.zeros(run.mc.n_future + 1, dtype=torch.float64, device=run.device)
    run.engine.eval()
    try:
        for _ in range(n_micro):
            output = _stage_forward(run, next(batches), comm.recv_forward())
            if not run.plan.is_last:
                comm.send_forward(output)
                continue
            loss, head_losses = output
            sums[0] += loss.double()
            sums[1:] += head_losses.double()
        comm.wait_sends()
    finally:
        run.engine.train()
    _sum_over_ranks(run, sums)
    return (sums / (run.dims.dp * run.dims.cp * n_micro)).cpu()


def _stage_forward(run: Run, batch: dict, received: torch.Tensor | None):
    """This stage's forward of one micro-batch: the first stage reads the tokens, the others the
    previous stage's activation; the last returns (loss, head losses), the others their output.
    Every stage reads the batch's documents (its attention layers need them)."""
    dev, dims, seq = run.device, run.dims, batch["tokens"].shape[1]
    docs = _documents(run.cfg, batch, dev)
    local = keys = None  # context parallelism: this rank's positions, and where the gathered keys sit
    if dims.cp > 1:
        local, keys = local_positions(seq, dims.cp, dims.cp_rank, dev), gathered_positions(seq, dims.cp, dev)
    layout = None if docs is None and local is None else \
        token_layout(docs, seq, query_index=local, key_index=keys, device=dev)
    tokens = batch["tokens"].to(dev)
    x = (tokens if local is None else tokens[:, local]) if run.plan.is_first else received
    if not run.plan.is_last:
        return run.engine(x, layout=layout)
    # Shifted and normalised on the whole sequence, then this rank's positions: head k at the end of a
    # chunk is scored on a label from another rank's chunk, with the whole sequence's weights.
    targets = run.stage.model.targets(batch["labels"].to(dev).long(), batch["loss_mask"].to(dev).float(), docs)
    if local is None:
        return run.engine(x, targets, layout=layout)
    loss, head_losses = run.engine(x, targets.select(local), layout=layout)
    # Each rank's loss is its share of the sequence's; DeepSpeed averages gradients over dp x cp, so
    # times cp the average over the context-parallel ranks is the sum, the gradient of the whole.
    return loss * dims.cp, head_losses * dims.cp


def _documents(cfg: TrainConfig, batch: dict, device) -> Documents | None:
    """The batch's packed documents when --reset-attention-mask or --reset-position-ids is on."""
    d = cfg.data
    if not (d.reset_attention_mask or d.reset_position_ids):
        return None
    return Documents(batch["segment_ids"].to(device).long(), batch["label_segment_ids"].to(device).long(),
                     mask_attention=d.reset_attention_mask, reset_positions=d.reset_position_ids)


def _sum_over_ranks(run: Run, sums: torch.Tensor) -> None:
    """All-reduce loss sums in place so that each loss counts once: only the last stage's tensor rank 0
    contributes (the other tensor ranks computed the same losses, the other stages none)."""
    if not (run.plan.is_last and run.dims.tp_rank == 0):
        sums.zero_()
    dist.all_reduce(sums)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _deepspeed_keeps_no_norm(run: Run) -> bool:
    """ZeRO-0 in fp32: DeepSpeed clips the plain gradients but does not keep their norm (its ZeRO 1-3
    and bf16 optimizers do)."""
    e = run.engine
    return run.cfg.parallel.zero_stage == 0 and not (e.bfloat16_enabled() or e.fp16_enabled())


def _grad_norm_before_step(run: Run) -> float:
    """The norm DeepSpeed's ZeRO-0 clipping computes, from the same (already data-parallel averaged)
    gradients and with the same model-parallel reduction: its own ``clip_grad_norm_`` with an infinite
    limit, which scales nothing."""
    from deepspeed.runtime.utils import clip_grad_norm_

    return float(clip_grad_norm_(run.stage.parameters(), max_norm=float("inf"), mpu=run.engine.mpu))


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _flops_per_token(mc: ModelConfig, seq: int) -> float:
    nonembed = mc.num_parameters() - mc.vocab_size * mc.hidden_size  # keeps the unembedding
    return model_flops_per_token(nonembed, mc.n_trunk_layers + mc.n_future, mc.hidden_size, seq)


# --------------------------------------------------------------------------------------------
# The run.


def _save(run: Run, writer: Writer, reason: str) -> None:
    cfg = run.cfg
    if not cfg.checkpoint.save:
        run.log.info(f"checkpoint: not saved ({reason}): checkpoint.save is empty")
        return
    # The ranks end a step at different times; that wait is paid every step (stop.agreed's all-reduce)
    # and is not the save's: its time starts when every rank is in it.
    dist.barrier()
    t0 = time.perf_counter()
    path = ckpt_engine.save(cfg.checkpoint.save, run.engine, run.stage, run.dims, run.state, dump_yaml(cfg),
                            run.mc, cfg.parallel.zero_stage, cfg.checkpoint.keep_last, cfg.data.tokenizer_model,
                            writer, cfg.parallel.distributed_timeout_minutes * 60, run.log.info)
    if writer.background:
        run.log.info(f"checkpoint: {path.name} handed to the writer in {time.perf_counter() - t0:.2f} s "
                     f"({reason}); copied to host memory and written in the background")
    else:
        run.log.info(f"checkpoint: saved {path} in {time.perf_counter() - t0:.2f} s ({reason})")


def train(cfg: TrainConfig) -> int:
    """Train under torchrun (or as one process). Returns the exit code."""
    run, dataset, valid = setup(cfg)
    cfg, state = run.cfg, run.state
    sampler = ResumableSampler(len(dataset), cfg.batch.micro_batch_size, run.dims.dp_rank, run.dims.dp,
                               state.consumed_samples)
    micro = MicroBatches(dataset, sampler)
    stop = StopRequest(enabled=cfg.checkpoint.save_on_signal)
    writer = Writer(background=cfg.checkpoint.async_save)
    tokens_per_step = cfg.batch.global_batch_size * cfg.data.seq_length
    flops_per_token = _flops_per_token(run.mc, cfg.data.seq_length)
    peak = cfg.logging.peak_tflops * 1e12 or default_peak_flops()
    code, saved_at = EXIT_OK, state.step  # a resume that has nothing left to train saves nothing
    lg = cfg.logging
    profiler = StepProfiler(lg.profile_step_start, lg.profile_step_end,
                            lg.profile_dir or f"{cfg.checkpoint.save}/profile", run.dims.rank, lg.profile_ranks,
                            report=run.log.info)
    try:
        while state.step < cfg.schedule.train_iters:
            t0 = time.perf_counter()
            lr = lr_at(cfg, state.step)
            run.optimizer.set_lr(lr)
            with profiler.wrap(state.step + 1):
                stats, skipped, grad_norm = train_step(run, [next(micro) for _ in range(run.gas)])
            for waited in writer.take_copy_waits():  # the optimizer step waited for a save's host copy
                run.log.info(f"checkpoint: the optimizer step waited {waited:.2f} s for the host copy")
            state.step += 1
            state.consumed_samples += cfg.batch.global_batch_size
            state.epoch = sampler.epoch(state.consumed_samples)
            state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if skipped else 0
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            validation = None
            every = cfg.schedule.eval_interval
            if every and (state.step % every == 0 or state.step == cfg.schedule.train_iters):
                t_eval = time.perf_counter()
                validation = evaluate(run, valid)
                eval_s = time.perf_counter() - t_eval
            run.log.log(StepMetrics(
                step=state.step, loss=float(stats[0]), head_losses=[float(x) for x in stats[1:-1]], lr=lr,
                grad_norm=grad_norm, tokens_per_s=tps,
                mfu=flops_per_token * tps / (peak * run.dims.world_size) if peak else None,
                memory_gib=round(_memory_gib(), 3), step_time_s=dt, consumed_samples=state.consumed_samples,
                skipped=skipped, valid_loss=None if validation is None else float(validation[0]),
                valid_head_losses=None if validation is None else [float(x) for x in validation[1:]]))
            if validation is not None:
                run.log.info(validation_line(state.step, validation, eval_s))
            if state.nonfinite_in_a_row >= cfg.logging.max_nonfinite_in_a_row:
                run.log.info(f"stopping: {state.nonfinite_in_a_row} non-finite losses in a row "
                             f"(logging.max_nonfinite_in_a_row)")
                _save(run, writer, "non-finite losses")
                code, saved_at = EXIT_NONFINITE, state.step
                break
            interval = cfg.checkpoint.save_interval
            if interval and state.step % interval == 0:
                _save(run, writer, f"every {interval} steps")
                saved_at = state.step
            if stop.agreed(run.device):
                run.log.info(f"signal {stop.signum or 'on another rank'}: saving and stopping at step {state.step}")
                if saved_at != state.step:
                    _save(run, writer, "signal")
                    saved_at = state.step
                break
        if code == EXIT_OK and saved_at != state.step:
            _save(run, writer, "end of training")
        writer.wait()  # the end of training (a signal, too) waits for a pending write
    except BaseException:
        code = EXIT_RAISED  # for the logs; the exception goes on up
        raise
    finally:
        profiler.finish()
        stop.restore()
        run.log.close(code)
    shutdown()
    return code
