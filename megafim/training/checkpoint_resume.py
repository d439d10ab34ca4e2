"""Where a run resumes from: which checkpoint (``--load``, or ``--save`` when it holds checkpoints),
verified against its manifest, and whether this run's settings may continue it.

Rank 0 reads and verifies; the others receive its answer, so that every rank loads the same
checkpoint and an error stops every rank at once with the same one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
import yaml

from megafim.checkpoint import compat, engine, find
from megafim.checkpoint.format import CONFIG_YAML, CheckpointError
from megafim.checkpoint.state import TrainerState, read_trainer_state
from megafim.checkpoint.weights import read_model_config, special_tokens
from megafim.model import ModelConfig
from megafim.parallel import ParallelDims
from megafim.training.cli import dump_yaml
from megafim.training.config import ConfigError, TrainConfig


@dataclass
class ResumePoint:
    ckpt: Path | None = None
    """The checkpoint to resume from; None starts from scratch."""
    state: TrainerState | None = None
    same_layout: bool = False
    """Saved with this run's tp / pp / dp / ZeRO stage: DeepSpeed's state loads as it is."""
    notes: list[str] = field(default_factory=list)
    """What the log should say about the choice."""


def load_dir(cfg: TrainConfig, notes: list[str]) -> str:
    """The directory to resume from, '' for none.

    ``checkpoint.load`` when set: a directory without checkpoints is refused, unless it is also
    ``checkpoint.save`` (the restartable-job idiom ``--save D --load D``: the first start is fresh).
    Unset: ``checkpoint.save`` when it holds checkpoints, so that a job restarted by torchrun or a
    scheduler with the same arguments continues instead of starting over."""
    ck = cfg.checkpoint
    if ck.load:
        if find.holds_checkpoints(ck.load):
            return ck.load
        if ck.save and Path(ck.save).resolve() == Path(ck.load).resolve():
            notes.append(f"resume: {ck.load} holds no checkpoint yet: starting from scratch")
            return ""
        raise ConfigError(f"checkpoint.load: {ck.load} holds no checkpoint (no 'latest', no step_N/); "
                          "drop --load to start from scratch")
    if ck.save and find.holds_checkpoints(ck.save):
        notes.append(f"resume: checkpoint.load is unset and {ck.save} holds checkpoints: resuming from it")
        return ck.save
    return ""


def inherit_special_tokens(cfg: TrainConfig, notes: list[str]) -> None:
    """A run that names no ``data.special_tokens`` takes those of the checkpoint it continues (a resume,
    or an import named with ``--special-token``), so the tokens are the same without the flags given
    again; they go into this run's ``config.yaml`` too. Read on every rank before the tokenizer loads
    (a file read); an unreadable checkpoint is left to ``resume_point`` to report."""
    if cfg.data.special_tokens:
        return
    load = load_dir(cfg, [])
    try:
        named = special_tokens(find.resolve(load)) if load else {}
    except CheckpointError:
        return
    if named:
        cfg.data.special_tokens = named
        notes.append(f"data.special_tokens: {named} from {load}, as its run named them")


def _choose_on_rank0(cfg: TrainConfig) -> tuple[str | None, str | None, list[str]]:
    """(checkpoint path or None, error or None, notes), computed where the files are read once."""
    notes: list[str] = []
    try:
        load = load_dir(cfg, notes)
        ckpt = find.verified_for_resume(load, cfg.checkpoint.verify, notes.append) if load else None
        return (str(ckpt) if ckpt else None), None, notes
    except (ConfigError, CheckpointError) as exc:
        return None, str(exc), notes


def resume_point(cfg: TrainConfig, dims: ParallelDims, mc: ModelConfig) -> ResumePoint:
    """Collective: every rank calls it after the process groups exist."""
    answer = [_choose_on_rank0(cfg) if dims.rank == 0 else None]
    if dist.is_initialized() and dims.world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    path, error, notes = answer[0]
    if error:
        raise ConfigError(error)
    if path is None:
        return ResumePoint(notes=notes)
    ckpt = Path(path)
    try:
        state = read_trainer_state(ckpt)
        saved_cfg = yaml.safe_load((ckpt / CONFIG_YAML).read_text(encoding="utf-8")) or {}
        refused, changed = compat.compare(ckpt, read_model_config(ckpt), mc, saved_cfg,
                                          yaml.safe_load(dump_yaml(cfg)), bool(state.layout),
                                          cfg.checkpoint.allow_changes)
    except (OSError, yaml.YAMLError, CheckpointError) as exc:
        raise ConfigError(f"checkpoint.load: {exc}") from None
    if refused:
        raise ConfigError(f"{refused}: resuming {ckpt}")
    if changed:
        notes.append(f"resume: changed since {ckpt.name}: " + "; ".join(changed))
    same = state.layout == engine.layout_of(dims, cfg.parallel.zero_stage)
    return ResumePoint(ckpt, state, same, notes)


def load_engine_state(ckpt: Path, ds_engine) -> None:
    try:
        engine.load_engine_state(ckpt, ds_engine)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def load_resharded_state(ckpt: Path, ds_engine, stage, dims: ParallelDims, saved: TrainerState) -> int | None:
    try:
        return engine.load_resharded_state(ckpt, ds_engine, stage, dims, saved.step, saved.consumed_samples)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
