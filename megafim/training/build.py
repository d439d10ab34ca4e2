"""From a ``TrainConfig`` to the pieces the loop runs: the model config, this rank's pipeline stage
(tensor-parallel when tp > 1) and the training dataset.

Every rank lays out the full model on the meta device (no memory), keeps its stage (the layers of
other stages are deleted, so parameter names like ``layers.7.mlp.up_proj.weight`` stay those of the
whole model on every stage, which is what makes the layout-free checkpoint of ``megafim.checkpoint.weights``
possible), shards it over tensor parallelism, and only then makes its weights, one whole parameter at
a time: a rank never holds more than its share plus one full tensor, and every layout starts from the
same weights (``GPT``'s ``initial_value``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megafim.data.config import DataConfig
from megafim.model import GPT, ModelConfig
from megafim.model.gpt import initial_value
from megafim.parallel.dims import ParallelDims
from megafim.parallel.context_parallel import apply_context_parallel
from megafim.parallel.tensor_parallel import apply_tensor_parallel
from megafim.training.config import ConfigError, TrainConfig, build_data_config

@dataclass(frozen=True)
class StagePlan:
    """Which parts of the model pipeline stage ``stage`` holds."""

    stage: int
    n_stages: int
    layers: tuple[int, ...]
    """Trunk layer indices on this stage, in order."""

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1


def plan_stages(n_trunk: int, n_future: int, n_stages: int) -> list[StagePlan]:
    """Cut the trunk into contiguous slices, counting the heads (all on the last stage) as blocks
    too, so that every stage runs about the same number of transformer blocks."""
    if n_stages == 1:
        return [StagePlan(0, 1, tuple(range(n_trunk)))]
    total = n_trunk + n_future
    last_trunk = max(0, min(n_trunk - (n_stages - 1), round(total / n_stages) - n_future))
    front = n_trunk - last_trunk  # split over the first n_stages - 1 stages, earlier ones get the extra
    sizes = [front // (n_stages - 1) + (1 if s < front % (n_stages - 1) else 0) for s in range(n_stages - 1)]
    sizes.append(last_trunk)
    plans, start = [], 0
    for s, size in enumerate(sizes):
        plans.append(StagePlan(s, n_stages, tuple(range(start, start + size))))
        start += size
    return plans


class PipelineStage(nn.Module):
    """One stage's share of a GPT. forward: first stage tokens (B, T) -> hidden (B, T, d); middle
    hidden -> hidden; last stage hidden (or tokens when it is also the first) -> (loss, head_losses).
    With one stage this is the whole model: tokens -> (loss, head_losses)."""

    def __init__(self, model: GPT, plan: StagePlan):
        super().__init__()
        keep = {str(i) for i in plan.layers}
        for key in [k for k in model.layers.keys() if k not in keep]:
            del model.layers[key]
        if not plan.is_first:
            del model.embed_tokens
        if not plan.is_last:
            del model.heads, model.norm, model.lm_head
        self.model, self.plan = model, plan

    def forward(self, x: Tensor, labels=None, loss_mask: Tensor | None = None, layout=None):
        """``labels``: (B, T) with ``loss_mask``, or ``HeadTargets``; ``layout``: see ``GPT.trunk``."""
        h = self.model.embed(x) if self.plan.is_first else x  # (B, T, d)
        h = self.model.trunk(h, layout=layout)
        if not self.plan.is_last:
            return h
        return self.model.loss_from_trunk(h, labels, loss_mask, layout=layout)

    def full_state_names(self) -> dict[str, nn.Parameter]:
        """Parameters under the whole model's names (``layers.3.mlp.up_proj.weight``)."""
        return dict(self.model.named_parameters())


# (whole-model parameter name, full shape) -> the full tensor, e.g. a checkpoint's weights.
WeightSource = Callable[[str, tuple[int, ...]], Tensor]


def build_stage(mc: ModelConfig, plan: StagePlan, seed: int, dims: ParallelDims | None = None,
                weights: WeightSource | None = None, sequence_parallel: bool = False) -> PipelineStage:
    """This rank's stage on the CPU: the blocks of ``plan``, tensor-parallel over ``dims`` when given,
    its weights initialised from ``seed`` (the slice of what ``torch.manual_seed(seed); GPT(mc)``
    holds) or read from ``weights``. Each weight is made whole, sliced and dropped before the next."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        stage = PipelineStage(GPT(mc), plan)
    if dims is not None:
        apply_tensor_parallel(stage.model, dims, sequence_parallel=sequence_parallel)
        apply_context_parallel(stage.model, dims)
    tp, tp_rank = (dims.tp, dims.tp_rank) if dims is not None else (1, 0)
    # Leaving the meta device makes new Parameter objects: keep the attributes tensor parallelism set
    # on them (tensor_model_parallel, partition_dim), which DeepSpeed and the checkpoints read.
    marks = {name: dict(param.__dict__) for name, param in stage.named_parameters()}
    stage.to_empty(device="cpu")
    stage.model.tie_weights()  # to_empty made the embedding and a tied unembedding two Parameters
    for name, param in stage.named_parameters():
        param.__dict__.update(marks[name])
    with torch.no_grad():
        for name, param in stage.model.named_parameters():
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            shape = tuple(n * tp if d == dim else n for d, n in enumerate(param.shape))
            full = weights(name, shape) if weights is not None else \
                initial_value(mc, name, shape, stage.model.init_seed)
            param.copy_(full if dim is None else full.chunk(tp, dim=dim)[tp_rank])
    return stage


def checked_data_config(cfg: TrainConfig) -> DataConfig:
    """The run's ``DataConfig`` with its index-cache folder, after checking that every dataset's
    ``.bin`` and ``.idx`` exist (cheap: the trainer calls it before building anything)."""
    data_cfg = build_data_config(cfg)
    # Default cache: beside the first dataset, so every run on it (and every rank) shares the index.
    cache_dir = cfg.data.cache_dir or str(Path(data_cfg.data_paths[0]).parent / "index-cache")
    data_cfg = dataclasses.replace(data_cfg, cache_dir=cache_dir)
    try:
        data_cfg.check_files()
    except FileNotFoundError as exc:
        raise ConfigError(f"data.data_path: {exc}") from None
    return data_cfg


def build_train_valid_datasets(cfg: TrainConfig, tokenizer, num_train: int, num_valid: int, is_builder: bool):
    """(training split, validation split or None when ``num_valid`` is 0), each blended when there are
    several paths and sized for that many samples."""
    from megafim.data.builder import build_datasets

    data_cfg = checked_data_config(cfg)
    d = cfg.data
    datasets = build_datasets(data_cfg, (num_train, num_valid, 0), tokenizer=tokenizer, is_builder=is_builder,
                              document_segments=d.reset_attention_mask or d.reset_position_ids)
    if datasets["train"] is None:
        raise ConfigError(f"data.split {d.split!r} leaves no training documents in {d.data_path}")
    if num_valid and datasets["valid"] is None:
        raise ConfigError(f"data.split {d.split!r} leaves no validation documents in {d.data_path} "
                          "(schedule.eval_interval needs some)")
    return datasets["train"], datasets["valid"]

