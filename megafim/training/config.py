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

from megafim.data.config import DataConfig
from megafim.data.fim import FimConfig
from megafim.model.config import ModelConfig
from megafim.training.field_docs import field_docs


class ConfigError(ValueError):
    """A bad configuration value; the message names the field (and the file, when one was read)."""


def _section(name: str, doc: str, spec: list[tuple[str, Any, Any]]) -> type:
    """A mutable dataclass ``name`` with fields ``(name, type, dataclasses.field(...))``."""
    return dataclasses.make_dataclass(name, spec, namespace={"__module__": __name__, "__doc__": doc})


def _setting(default: Any, doc: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **metadata})


def _mirrored(domain: type, names: tuple[str, ...], defaults: dict[str, Any] | None = None,
              optional: bool = False) -> list[tuple[str, Any, Any]]:
    """Fields of the domain config ``domain`` as trainer settings: the same name, type and docstring
    (read from ``domain``, so that each setting is defined once). ``optional`` makes every one
    ``None``-able with default None ("not set here")."""
    hints, docs = typing.get_type_hints(domain, localns=globals()), field_docs(domain)
    known = {f.name: f for f in dataclasses.fields(domain)}
    spec = []
    for name in names:
        tp, f = hints[name], known[name]
        if optional:
            spec.append((name, typing.Optional[tp], _setting(None, docs.get(name, ""))))
        else:
            default = (defaults or {}).get(name, f.default)
            spec.append((name, tp, _setting(default, docs.get(name, ""))))
    return spec


# The special tokens a Hugging Face tokenizer's spellings can be named for (data.special_tokens).
SPECIAL_TOKEN_NAMES = ("eod", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad")

MODEL_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))

# ``model:``: a named size and ``compile``, then every ModelConfig field as an optional override of the
# size (null keeps the size's value). A new model option is a trainer setting as soon as it is a
# ModelConfig field; ModelConfig alone validates the values.
ModelSection = _section("ModelSection", "The model: a named size, overridden field by field.", [
    ("size", str, _setting("tiny", "Named model size from ``megafim.model``'s registry (``tiny``, "
                                   "``125M``, ``350M``, ``1.3B``, ``7B``); the other fields override it.")),
    ("compile", bool, _setting(False, "``torch.compile`` each transformer block (trunk and heads); the "
                                      "fused loss stays eager. Not with ZeRO-3, whose parameter hooks run "
                                      "inside the blocks.")),
    *_mirrored(ModelConfig, MODEL_CONFIG_FIELDS, optional=True),
])


def model_overrides(section: Any) -> dict[str, Any]:
    """The ModelConfig fields that ``section`` sets (not None)."""
    return {name: getattr(section, name) for name in MODEL_CONFIG_FIELDS if getattr(section, name) is not None}


@dataclass
class ParallelSection:
    tensor: int = 1
    """Tensor-parallel degree (ranks that split each layer's matrices)."""
    pipeline: int = 1
    """Pipeline-parallel degree (stages that each hold a slice of the layers)."""
    zero_stage: int = field(default=1, metadata={"choices": (0, 1, 2, 3)})
    """DeepSpeed ZeRO stage over the data-parallel group."""
    backend: str = field(default="auto", metadata={"choices": ("auto", "nccl", "gloo")})
    """torch.distributed backend: ``auto`` (nccl with CUDA, else gloo), ``nccl`` or ``gloo``."""
    distributed_timeout_minutes: float = 10.0
    """How long a rank waits for the others: to start (process-group rendezvous after a launch or a
    torchrun restart) and in any one collective; a rank that waits longer fails instead of hanging."""
    sequence_parallel: bool = False
    """Split the activations between the tensor-parallel matmuls along the sequence (Korthikanti et
    al. 2022); needs ``tensor`` > 1 and a sequence length divisible by it."""
    context: int = 1
    """Context-parallel degree: each sample's sequence is split over this many ranks (docs/parallelism.md)."""


# ``data:``: the trainer's own data settings, then DataConfig's sample settings, then the FIM transform
# (a FimConfig itself). ``build_data_config`` turns it into the DataConfig the datasets are built from.
DataSection = _section("DataSection", "Datasets, tokenizer, sequence length, FIM.", [
    ("data_path", list, field(default_factory=list, metadata={"doc": (
        "Dataset prefixes (``<prefix>.bin/.idx``; the ``.bin`` or ``.idx`` path itself is accepted), "
        "optionally Megatron-style weighted: ``[0.7, a, 0.3, b]``.")})),
    ("tokenizer_model", str, _setting("", "The tokenizer the data was tokenized with (a sentencepiece "
                                          "``.model`` file).")),
    ("cache_dir", str, _setting("", "Where the sample-index cache goes; empty means an ``index-cache`` "
                                    "folder next to the first dataset, shared by every run and rank.")),
    *_mirrored(DataConfig, ("seq_length", "split", "fingerprint", "verify_cache"),
               defaults={"seq_length": 64, "split": "98,2,0"}),
    ("fim", FimConfig, field(default_factory=FimConfig, metadata={"doc": "Fill-in-the-middle transform."})),
    ("reset_attention_mask", bool, _setting(False, (
        "A token attends only to earlier tokens of its own document (documents end with end-of-text, "
        "after FIM); labels of a later document than their position are not trained on (docs/model.md)."))),
    ("reset_position_ids", bool, _setting(False, "Rotary positions restart at 0 at the first token of every "
                                                 "document of a packed context.")),
    ("tokenizer_type", str, _setting("", (
        "``GPTSentencePieceTokenizer`` or ``HuggingFaceTokenizer`` (a ``tokenizer.json`` or a directory); "
        "empty: from ``tokenizer_model`` (a JSON file or a directory is a Hugging Face tokenizer)."),
        choices=("", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer"))),
    ("special_tokens", dict, field(default_factory=dict, metadata={"doc": (
        "Hugging Face tokenizers: spellings of ``eod``, ``fim_prefix``, ``fim_middle``, ``fim_suffix``, "
        "``fim_pad`` when not the known ones, e.g. ``{fim_pad: \"<|reserved_special_token_0|>\"}``.")})),
])


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
    precision: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32")})
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
    verify: bool = True
    """Check the checkpoint's files against its manifest before resuming (docs/checkpoints.md)."""
    allow_changes: list = field(default_factory=list)
    """Settings that normally may not change on resume which this run changes on purpose, by name:
    ``data.data_path``, ``data.split``, ``data.fim.rate``, ``data.fim.spm_rate``, ``data.fim.level``,
    ``data.fim.split_token``, ``data.tokenizer_model``, ``data.special_tokens`` (the model shape never may)."""
    async_save: bool = False
    """Copy checkpoints to host memory and write them in a background thread: training continues at
    once, and the next optimizer step waits for the copy; ``latest`` moves when every rank's files are
    written (docs/checkpoints.md)."""


@dataclass
class LoggingSection:
    log_interval: int = 1
    """Print a console line every this many steps (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<save>/tensorboard``."""
    progress_bar: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})
    """``auto`` (when stdout is a terminal), ``on`` or ``off`` (YAML's booleans on/off/true/false work)."""
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
    wandb_project: str = ""
    """Weights & Biases project to log the metrics.jsonl scalars to (needs ``pip install wandb``); empty: no
    W&B. ``WANDB_MODE=offline`` keeps the run on disk (``wandb sync`` uploads it later)."""
    wandb_exp_name: str = ""
    """The W&B run's name (empty: W&B picks one)."""
    wandb_save_dir: str = ""
    """W&B writes its local run files under ``<this>/wandb`` (default: ``checkpoint.save``, else W&B's own
    default, ``WANDB_DIR`` or the working directory)."""


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


def _check_type(value: Any, tp: Any, name: str, where: str, choices: tuple | None = None) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` when lossless, else raise naming ``name``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)], name, where,
                           choices)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, name + ".", where)
    if tp is str and isinstance(value, bool) and choices and {"on", "off"} <= set(choices):
        value = "on" if value else "off"  # YAML 1.1 reads on/off/yes/no as booleans
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}{name}: expected {tp.__name__}, got {value!r}")
    elif tp is list or origin is list:
        if isinstance(value, str):  # one path given as a string
            value = value.split()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{name}: expected a list, got {value!r}")
        value = list(value)
    elif tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{name}: expected a mapping, got {value!r}")
        value = dict(value)
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


# The domain configs validate their own fields and name them ``FimConfig.rate``...; in the trainer's
# messages those are the settings ``data.fim.rate``...
_DOMAIN_PREFIXES = {"ModelConfig.": "model.", "DataConfig.": "data.", "FimConfig.": "data.fim."}


def domain_error(exc: Exception, where: str = "") -> ConfigError:
    """A domain config's ValueError as a ConfigError that names the trainer setting."""
    message = str(exc)
    for old, new in _DOMAIN_PREFIXES.items():
        message = message.replace(old, new)
    return ConfigError(where + message)


def from_dict(cls: type, data: dict, prefix: str = "", where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    if cls is ModelSection and isinstance(data.get("overrides"), dict):
        data = fold_model_overrides(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}unknown field {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {name: _check_type(value, hints[name], prefix + name, where, fields[name].metadata.get("choices"))
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a frozen domain config (FimConfig) validating itself
        raise domain_error(exc, where) from None


def fold_model_overrides(model: dict) -> dict:
    """Older configs put ModelConfig fields under ``model.overrides``; they are ``model.<field>`` now."""
    out = {k: v for k, v in model.items() if k != "overrides"}
    for name, value in model["overrides"].items():
        if name not in MODEL_CONFIG_FIELDS:
            raise ConfigError(f"unknown field model.overrides.{name} (ModelConfig fields: "
                              f"{', '.join(MODEL_CONFIG_FIELDS)})")
        if out.get(name) is not None and out[name] != value:
            raise ConfigError(f"model.{name} = {out[name]!r} and model.overrides.{name} = {value!r} disagree")
        out[name] = value
    return out


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (what YAML and checkpoints store)."""
    return dataclasses.asdict(cfg)


def merge_dicts(base: dict, over: dict) -> dict:
    """Recursively overlay ``over`` onto ``base`` (new dict); mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Validation: everything that can be checked before process groups exist.


def _positive(value: float, name: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_choices(cfg: Any, prefix: str = "") -> None:
    """Every field whose metadata lists ``choices`` holds one of them (also after changes in code)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name} must be one of {', '.join(map(str, f.metadata['choices']))}, "
                              f"got {value!r}")


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    """World size / (tp x pp x cp), raising when it does not divide (``ParallelDims``' own check)."""
    from megafim.parallel.dims import ParallelSizeError, check_sizes

    p = cfg.parallel
    try:
        return check_sizes(p.tensor, p.pipeline, None, world_size, p.context)
    except ParallelSizeError as exc:
        raise ConfigError(f"parallel: {exc} (--tensor-model-parallel-size, --pipeline-model-parallel-size, "
                          "--context-parallel-size)") from None


def _check_wandb(lg: LoggingSection) -> None:
    if not lg.wandb_project:
        for name in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(lg, name):
                raise ConfigError(f"logging.{name} is set but logging.wandb_project (--wandb-project) is "
                                  "empty, so nothing would be logged to W&B")
        return
    try:  # the real import (not a lookup): a broken install fails here, not after the model is built
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logging.wandb_project (--wandb-project) is set but wandb is not installed: "
                          "pip install wandb") from None


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


# --------------------------------------------------------------------------------------------
# The domain configs the trainer's sections build: each validates its own fields.

# The vocabulary is padded to a multiple of this, independent of tp, so that the model shape (and the
# checkpoint) is the same for every tensor-parallel degree that divides it (Megatron pads by 128 x tp).
VOCAB_MULTIPLE = 128


def resolve_model_config(cfg: TrainConfig, tokenizer_vocab: int | None,
                         notes: list[str] | None = None) -> ModelConfig:
    """The named size with the ``model.*`` fields set over it, and the tokenizer's vocabulary padded to
    ``VOCAB_MULTIPLE`` unless ``model.vocab_size`` is set. ``max_seq_len`` is raised to
    ``data.seq_length`` when it is not set (a line goes to ``notes``), and refused when it is set
    smaller. Errors name the ``model.*`` setting."""
    from megafim.model.registry import MODEL_SIZES

    if cfg.model.size not in MODEL_SIZES:
        raise ConfigError(f"model.size: unknown size {cfg.model.size!r}; known sizes: {', '.join(MODEL_SIZES)}")
    overrides = model_overrides(cfg.model)
    if tokenizer_vocab is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    base = MODEL_SIZES[cfg.model.size]
    seq = cfg.data.seq_length
    if "max_seq_len" in overrides and overrides["max_seq_len"] < seq:
        raise ConfigError(f"data.seq_length {seq} exceeds model.max_seq_len {overrides['max_seq_len']} "
                          "(raise model.max_seq_len, or leave it unset to follow data.seq_length)")
    if "max_seq_len" not in overrides and isinstance(seq, int) and base.max_seq_len < seq:
        overrides["max_seq_len"] = seq
        if notes is not None:
            notes.append(f"model.max_seq_len raised from size {cfg.model.size}'s {base.max_seq_len} to "
                         f"data.seq_length {seq}")
    try:
        mc = base.replace(**overrides)
    except ValueError as exc:
        raise domain_error(exc) from None
    if tokenizer_vocab is not None and mc.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size = {mc.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_vocab} tokens ({cfg.data.tokenizer_model})")
    return mc


# Stands in for the dataset paths when only the other data settings are checked (``validate`` runs
# before the paths are required); never read as a path.
_UNSET_PATH = "<data.data_path not set>"


def build_data_config(cfg: TrainConfig, cache_dir: str | None = None) -> DataConfig:
    """The ``DataConfig`` of the ``data`` section (the seed is ``schedule.seed``; FIM is off at rate 0)."""
    d = cfg.data
    try:
        return DataConfig.from_megatron_args(
            [str(p) for p in d.data_path] or [_UNSET_PATH], split=d.split, seq_length=d.seq_length,
            seed=cfg.schedule.seed, cache_dir=cache_dir, fingerprint=d.fingerprint,
            verify_cache=d.verify_cache, fim=d.fim if d.fim.rate > 0 else None)
    except ValueError as exc:
        message = str(exc)
        if message.startswith(("data path", "DataConfig.data_paths", "DataConfig.weights")):
            raise ConfigError(f"data.data_path: {message}") from None
        raise domain_error(exc) from None

def _check_checkpoint(cfg: TrainConfig) -> None:
    from megafim.checkpoint.compat import OVERRIDABLE

    for name in cfg.checkpoint.allow_changes:
        if name not in OVERRIDABLE:
            raise ConfigError(f"checkpoint.allow_changes: {name!r} is not a setting that may be changed on "
                              f"purpose on resume (one of: {', '.join(OVERRIDABLE)})")
    if not cfg.parallel.distributed_timeout_minutes > 0:
        raise ConfigError(f"parallel.distributed_timeout_minutes must be > 0, got "
                          f"{cfg.parallel.distributed_timeout_minutes}")


def _check_sequence_splits(cfg: TrainConfig) -> None:
    """Sequence and context parallelism against the tensor-parallel degree and the sequence length."""
    p, seq = cfg.parallel, cfg.data.seq_length
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel (--sequence-parallel) needs parallel.tensor > 1: with one "
                          "tensor-parallel rank there is nothing to split")
    if p.sequence_parallel and seq % (p.tensor * p.context):
        raise ConfigError(f"parallel.sequence_parallel (--sequence-parallel): data.seq_length {seq} must split "
                          f"over parallel.tensor = {p.tensor} (per context-parallel chunk)")
    if not isinstance(p.context, int) or isinstance(p.context, bool) or p.context < 1:
        raise ConfigError(f"parallel.context (--context-parallel-size) must be a positive integer, got {p.context!r}")
    if p.context > 1 and seq % (2 * p.context):
        raise ConfigError(f"parallel.context (--context-parallel-size {p.context}): data.seq_length {seq} is not "
                          f"divisible by 2 x {p.context} (each rank holds two chunks)")


def validate(cfg: TrainConfig, world_size: int, model_config: Any = None) -> None:
    """Check ``cfg`` for ``world_size`` ranks before any process group exists; raises ``ConfigError``
    naming the field. The model and data settings are checked by building their domain configs (with
    the vocabulary unknown until the tokenizer is read); ``model_config`` (the resolved ``ModelConfig``)
    adds the shape checks against the parallel degrees."""
    p, b, s, o = cfg.parallel, cfg.batch, cfg.schedule, cfg.optimizer
    _check_choices(cfg)
    for name, value in [("parallel.tensor", p.tensor), ("parallel.pipeline", p.pipeline),
                        ("batch.micro_batch_size", b.micro_batch_size),
                        ("batch.global_batch_size", b.global_batch_size),
                        ("schedule.train_iters", s.train_iters)]:
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
    data = build_data_config(cfg)
    unknown = sorted(set(cfg.data.special_tokens) - set(SPECIAL_TOKEN_NAMES))
    if unknown:
        raise ConfigError(f"data.special_tokens: unknown name {unknown[0]!r} (known: {', '.join(SPECIAL_TOKEN_NAMES)})")
    _check_profiling(cfg)
    _check_wandb(cfg.logging)
    _check_checkpoint(cfg)
    _positive(s.eval_interval, "schedule.eval_interval", allow_zero=True)
    _positive(s.eval_iters, "schedule.eval_iters")
    if s.eval_interval and data.split_weights[1] == 0:
        raise ConfigError(f"schedule.eval_interval = {s.eval_interval} needs validation documents, but "
                          f"data.split {cfg.data.split!r} gives them no share (e.g. \"98,2,0\")")
    _check_sequence_splits(cfg)
    if cfg.model.compile and p.zero_stage == 3:
        raise ConfigError("model.compile = true with parallel.zero_stage = 3 is not supported: ZeRO-3 "
                          "gathers parameters in hooks inside the compiled blocks; use ZeRO 0-2")
    grad_accumulation_steps(cfg, world_size)
    validate_model_shape(cfg, model_config if model_config is not None else resolve_model_config(cfg, None))


def validate_model_shape(cfg: TrainConfig, mc: ModelConfig) -> None:
    """The resolved model shape against the tensor- and pipeline-parallel degrees."""
    from megafim.parallel.dims import ParallelSizeError
    from megafim.parallel.tensor_parallel import check_tensor_parallel_sizes

    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    try:
        check_tensor_parallel_sizes(mc, tp)
    except ParallelSizeError as exc:
        raise ConfigError(f"{domain_error(exc)} (parallel.tensor)") from None
    if mc.tie_embeddings and pp > 1:
        raise ConfigError(f"model.tie_embeddings = true with parallel.pipeline = {pp} is not supported (the "
                          "embedding and lm_head live on different stages); import the model with "
                          "tools/convert_hf_to_checkpoint.py --untie-embeddings")
    n_trunk = trunk_layers(mc)
    if pp > 1 and n_trunk < pp - 1:
        raise ConfigError(
            f"parallel.pipeline = {pp} stages need at least {pp - 1} trunk layers for the first "
            f"{pp - 1} stages; the model has {n_trunk} (model.n_layers counts the trunk plus head 1)")
    if cfg.data.seq_length > mc.max_seq_len:
        raise ConfigError(f"data.seq_length {cfg.data.seq_length} exceeds model.max_seq_len {mc.max_seq_len}")


def trunk_layers(mc: ModelConfig) -> int:
    """Trunk layers of a resolved model config (``n_layers`` counts the trunk plus the first head)."""
    return mc.n_layers - 1


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
