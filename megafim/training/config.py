"""The trainer's typed configuration: nested dataclasses, one per concern.

Precedence: the defaults below, then a YAML file, then command-line overrides (``cli.py``). Every
check that does not need a process group runs in ``validate`` before any distributed work starts,
and every error names the field it is about (``parallel.tensor``, ``batch.global_batch_size``, ...).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message names the field (and the file, when one was read)."""


@dataclass
class ModelSection:
    size: str = "tiny"
    """Named model size from ``megafim.model``'s registry (e.g. ``tiny``, ``125M``, ``1.3B``, ``7B``)."""
    n_future: int = 1
    """Number of future-token heads; head i predicts token t+i. 1 is ordinary next-token training."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of storing them."""
    compile: bool = False
    """``torch.compile`` each transformer block (trunk and heads); the fused loss stays eager. Not
    with ZeRO-3, whose parameter hooks run inside the blocks."""
    overrides: dict = field(default_factory=dict)
    """Any other ``ModelConfig`` field, e.g. ``{n_layers: 4, hidden_size: 128}``; applied over the size."""


@dataclass
class ParallelSection:
    tensor: int = 1
    """Tensor-parallel degree (ranks that split each layer's matrices)."""
    pipeline: int = 1
    """Pipeline-parallel degree (stages that each hold a slice of the layers)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3 over the data-parallel group."""
    backend: str = "auto"
    """torch.distributed backend: ``auto`` (nccl with CUDA, else gloo), ``nccl`` or ``gloo``."""


@dataclass
class FimSection:
    rate: float = 0.5
    """Probability that a document (or context piece) is FIM-transformed."""
    spm_rate: float = 0.5
    """Probability that a transformed piece uses the SPM format rather than PSM."""
    level: str = "context"
    """``context`` (transform pieces of each packed context, the paper's default) or ``document``."""


@dataclass
class DataSection:
    data_path: list = field(default_factory=list)
    """Dataset prefixes (``<prefix>.bin/.idx``), optionally Megatron-style weighted: ``[0.7, a, 0.3, b]``."""
    tokenizer_model: str = ""
    """The sentencepiece ``.model`` file that the data was tokenized with."""
    seq_length: int = 64
    """Tokens per training sample (the model's context length)."""
    split: str = "98,2,0"
    """Train/validation/test split of the documents, as relative weights."""
    cache_dir: str = ""
    """Where the sample-index cache goes; empty means next to the first dataset."""
    fim: FimSection = field(default_factory=FimSection)
    """Fill-in-the-middle transform settings."""
    tokenizer_type: str = ""
    """``GPTSentencePieceTokenizer`` or ``HuggingFaceTokenizer`` (a ``tokenizer.json`` or a directory);
    empty: from ``tokenizer_model`` (a JSON file or a directory is a Hugging Face tokenizer)."""
    special_tokens: dict = field(default_factory=dict)
    """Hugging Face tokenizers: spellings of ``eod``, ``fim_prefix``, ``fim_middle``, ``fim_suffix``,
    ``fim_pad`` when not the known ones, e.g. ``{fim_pad: "<|reserved_special_token_0|>"}``."""


@dataclass
class BatchSection:
    micro_batch_size: int = 2
    """Samples per data-parallel rank per forward/backward."""
    global_batch_size: int = 8
    """Samples per optimizer step across all data-parallel ranks (= micro x dp x accumulation steps)."""


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleSection:
    train_iters: int = 100
    """Optimizer steps to train for."""
    warmup_iters: int = 10
    """Linear warmup steps from 0 to ``optimizer.lr``."""
    decay_iters: int = 0
    """Steps over which the cosine decays to ``min_lr``; 0 means ``train_iters``."""
    seed: int = 1234
    """Seed for weights, data order and FIM (the same seed gives the same run)."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    eval_interval: int = 0
    """Compute the validation loss every this many steps and at the end; 0: never."""
    eval_iters: int = 10
    """Global batches per validation: the first ``eval_iters x global_batch_size`` samples of the
    validation split, the same ones every time, so the values are comparable across steps."""


@dataclass
class CheckpointSection:
    save: str = ""
    """Directory for checkpoints, ``metrics.jsonl`` and TensorBoard logs; empty saves nothing."""
    load: str = ""
    """Directory to resume from (its ``latest`` checkpoint); empty starts from scratch."""
    save_interval: int = 0
    """Save every this many steps; 0 saves only at the end and on a signal."""
    keep_last: int = 3
    """Keep this many most recent checkpoints and delete older ones; 0 keeps all."""
    save_on_signal: bool = True
    """Save and exit cleanly on SIGTERM/SIGUSR1 (cluster preemption)."""


@dataclass
class LoggingSection:
    log_interval: int = 1
    """Print a console line every this many steps (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<save>/tensorboard``."""
    progress_bar: str = "auto"
    """``auto`` (when stdout is a terminal), ``on`` or ``off``."""
    max_nonfinite_in_a_row: int = 5
    """Stop the run (with a checkpoint) after this many consecutive NaN/inf losses; each is skipped."""
    peak_tflops: float = 0.0
    """The accelerator's peak TFLOP/s for MFU; 0 guesses (989 for H100 bf16), on CPU MFU is not shown."""
    profile_step_start: int = 0
    """Record steps profile_step_start..profile_step_end (1-based) with torch.profiler; 0: no profiling."""
    profile_step_end: int = 0
    """The last profiled step (0: profile_step_start alone)."""
    profile_ranks: list = field(default_factory=lambda: [0])
    """The global ranks that profile."""
    profile_dir: str = ""
    """Where each profiled rank writes its trace and op table (default ``<checkpoint.save>/profile``)."""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    """The model shape and heads."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """Tensor, pipeline and ZeRO data parallelism."""
    data: DataSection = field(default_factory=DataSection)
    """Datasets, tokenizer, sequence length, FIM."""
    batch: BatchSection = field(default_factory=BatchSection)
    """Micro and global batch sizes."""
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    """AdamW and gradient clipping."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """Steps, warmup + cosine learning-rate schedule, seed, precision."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Saving, resuming, retention."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Console, TensorBoard, metrics.jsonl, NaN handling."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON file merged over the generated DeepSpeed config."""


# --------------------------------------------------------------------------------------------
# Building a config from plain dicts (YAML) with errors that name the field.


def _check_type(value: Any, tp: Any, name: str, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` when lossless, else raise naming ``name``."""
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}{name}: expected {tp.__name__}, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):  # one path given as a string
            return value.split()
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}{name}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}{name}: expected a mapping, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "", where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}unknown field {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, f"{prefix}{name}.", where)
        else:
            kwargs[name] = _check_type(value, tp, prefix + name, where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (what YAML and checkpoints store)."""
    return dataclasses.asdict(cfg)


def merge_dicts(base: dict, over: dict) -> dict:
    """Recursively overlay ``over`` onto ``base`` (new dict); mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides":
            out[key] = merge_dicts(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Validation: everything that can be checked before process groups exist.


def _positive(value: float, name: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _choice(value: str, name: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    """World size / (tp x pp), raising when it does not divide."""
    mp = cfg.parallel.tensor * cfg.parallel.pipeline
    if world_size % mp:
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline = {cfg.parallel.tensor} x {cfg.parallel.pipeline} = {mp} "
            f"does not divide the world size {world_size}")
    return world_size // mp


def grad_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank."""
    dp = data_parallel_size(cfg, world_size)
    per_step = cfg.batch.micro_batch_size * dp
    if cfg.batch.global_batch_size % per_step:
        raise ConfigError(
            f"batch.global_batch_size {cfg.batch.global_batch_size} is not divisible by "
            f"batch.micro_batch_size x data-parallel size = {cfg.batch.micro_batch_size} x {dp} = {per_step}")
    return cfg.batch.global_batch_size // per_step


def _check_profiling(cfg: TrainConfig) -> None:
    lg = cfg.logging
    _positive(lg.profile_step_start, "logging.profile_step_start", allow_zero=True)
    if not lg.profile_step_start:
        return
    if lg.profile_step_end and lg.profile_step_end < lg.profile_step_start:
        raise ConfigError(f"logging.profile_step_end {lg.profile_step_end} is before "
                          f"logging.profile_step_start {lg.profile_step_start}")
    if not (lg.profile_dir or cfg.checkpoint.save):
        raise ConfigError("logging.profile_step_start is set but neither logging.profile_dir nor "
                          "checkpoint.save says where the profile goes")
    if not lg.profile_ranks or not all(isinstance(r, int) and r >= 0 for r in lg.profile_ranks):
        raise ConfigError(f"logging.profile_ranks must list global ranks (integers >= 0), got "
                          f"{lg.profile_ranks}")


def validate(cfg: TrainConfig, world_size: int, model_config: Any = None) -> None:
    """Check ``cfg`` for ``world_size`` ranks; ``model_config`` (a resolved ``ModelConfig``) adds
    the shape checks (heads vs tp, layers vs pp). Raises ``ConfigError`` naming the field."""
    p, b, s, o = cfg.parallel, cfg.batch, cfg.schedule, cfg.optimizer
    for name, value in [("parallel.tensor", p.tensor), ("parallel.pipeline", p.pipeline),
                        ("batch.micro_batch_size", b.micro_batch_size),
                        ("batch.global_batch_size", b.global_batch_size),
                        ("schedule.train_iters", s.train_iters), ("data.seq_length", cfg.data.seq_length),
                        ("model.n_future", cfg.model.n_future)]:
        _positive(value, name)
    for name, value in [("schedule.warmup_iters", s.warmup_iters), ("schedule.decay_iters", s.decay_iters),
                        ("optimizer.min_lr", o.min_lr), ("optimizer.weight_decay", o.weight_decay),
                        ("optimizer.clip_grad", o.clip_grad), ("checkpoint.save_interval",
                        cfg.checkpoint.save_interval), ("checkpoint.keep_last", cfg.checkpoint.keep_last)]:
        _positive(value, name, allow_zero=True)
    _positive(o.lr, "optimizer.lr")
    _positive(cfg.logging.log_interval, "logging.log_interval")
    _positive(cfg.logging.max_nonfinite_in_a_row, "logging.max_nonfinite_in_a_row")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr {o.min_lr} is larger than optimizer.lr {o.lr}")
    for name, value in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)]:
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    for name, value in [("data.fim.rate", cfg.data.fim.rate), ("data.fim.spm_rate", cfg.data.fim.spm_rate)]:
        if not 0 <= value <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {value}")
    _choice(cfg.data.fim.level, "data.fim.level", ("context", "document"))
    _choice(cfg.data.tokenizer_type, "data.tokenizer_type", ("", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer"))
    for name in cfg.data.special_tokens:
        _choice(name, "data.special_tokens keys", ("eod", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad"))
    _choice(p.backend, "parallel.backend", ("auto", "nccl", "gloo"))
    _choice(s.precision, "schedule.precision", ("auto", "bf16", "fp32"))
    _choice(cfg.logging.progress_bar, "logging.progress_bar", ("auto", "on", "off"))
    _check_profiling(cfg)
    _positive(s.eval_interval, "schedule.eval_interval", allow_zero=True)
    _positive(s.eval_iters, "schedule.eval_iters")
    if s.eval_interval:
        from megafim.data.config import parse_split

        try:
            has_valid = parse_split(cfg.data.split)[1] > 0
        except ValueError as exc:
            raise ConfigError(f"data.split: {exc}") from None
        if not has_valid:
            raise ConfigError(f"schedule.eval_interval = {s.eval_interval} needs validation documents, but "
                              f"data.split {cfg.data.split!r} gives them no share (e.g. \"98,2,0\")")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if cfg.model.compile and p.zero_stage == 3:
        raise ConfigError("model.compile = true with parallel.zero_stage = 3 is not supported: ZeRO-3 "
                          "gathers parameters in hooks inside the compiled blocks; use ZeRO 0-2")
    grad_accumulation_steps(cfg, world_size)
    if model_config is not None:
        validate_model_shape(cfg, model_config)


def validate_model_shape(cfg: TrainConfig, mc: Any) -> None:
    """Divisibility of the resolved model shape by the tensor- and pipeline-parallel degrees."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    checks = [("n_heads", getattr(mc, "n_heads", None)), ("n_kv_heads", getattr(mc, "n_kv_heads", None)),
              ("ffn_hidden_size", getattr(mc, "ffn_hidden_size", None)),
              ("vocab_size", getattr(mc, "vocab_size", None))]
    for name, value in checks:
        if value and value % tp:
            raise ConfigError(f"model {name} = {value} is not divisible by parallel.tensor = {tp}")
    n_trunk = trunk_layers(mc)
    if n_trunk is not None and pp > 1 and n_trunk < pp - 1:
        raise ConfigError(
            f"parallel.pipeline = {pp} stages need at least {pp - 1} trunk layers for the first "
            f"{pp - 1} stages; the model has {n_trunk} (model n_layers counts the trunk plus head 1)")
    if getattr(mc, "max_seq_length", None) and cfg.data.seq_length > mc.max_seq_length:
        raise ConfigError(f"data.seq_length {cfg.data.seq_length} exceeds the model's max_seq_length "
                          f"{mc.max_seq_length}")


def trunk_layers(mc: Any) -> int | None:
    """Trunk layers of a resolved model config (``n_layers`` counts the trunk plus the first head)."""
    n_layers = getattr(mc, "n_layers", None)
    return None if n_layers is None else n_layers - 1


def decay_iters(cfg: TrainConfig) -> int:
    """The cosine decay length (``schedule.decay_iters``, or ``train_iters`` when 0)."""
    return cfg.schedule.decay_iters or cfg.schedule.train_iters


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    o, s = cfg.optimizer, cfg.schedule
    if s.warmup_iters and step < s.warmup_iters:
        return o.lr * (step + 1) / s.warmup_iters
    span = max(1, decay_iters(cfg) - s.warmup_iters)
    progress = min(1.0, (step - s.warmup_iters) / span)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))
