"""Apply Megatron-style tensor parallelism (and optionally sequence parallelism) to a built GPT.

Per block: q/k/v and gate/up become column-parallel (each rank keeps whole heads / whole FFN
columns), o and down become row-parallel, the attention's head counts become local. The embedding
becomes vocab-parallel and the unembedding a vocabulary shard: the loss is then a vocab-parallel
cross-entropy (GPT.loss_from_trunk passes the shard's group and first row to multi_token_loss).

Sequence parallelism (Korthikanti et al. 2022): between the matmuls, activations are split along the
sequence, so norms and residual adds run on T/tp tokens; the column-parallel inputs all-gather the
sequence and the row-parallel outputs reduce-scatter it. Norm weights, replicated but fed T/tp
tokens, get their gradients all-reduced. The heads receive the full trunk output and scatter it.
"""

from __future__ import annotations

from torch import nn

from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT, Block
from megafim.parallel.dims import ParallelDims, ParallelSizeError
from megafim.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceGather,
    SequenceParallelRMSNorm,
    SequenceScatter,
    VocabParallelEmbedding,
    VocabParallelUnembedding,
)


def check_tensor_parallel_sizes(config: ModelConfig, tp: int) -> None:
    """Raise ParallelSizeError naming the first ModelConfig field that tp does not divide."""
    for field in ("n_heads", "n_kv_heads", "ffn_hidden_size", "vocab_size"):
        value = getattr(config, field)
        if value % tp:
            raise ParallelSizeError(f"tensor parallelism: ModelConfig.{field} = {value} is not divisible by "
                                    f"the tensor-parallel size {tp}")


def _parallelize_block(block: Block, dims: ParallelDims, sequence_parallel: bool) -> None:
    group, tp = dims.tp_group, dims.tp
    attn, mlp = block.self_attn, block.mlp
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, ColumnParallelLinear(getattr(attn, name), group, sequence_parallel))
    attn.o_proj = RowParallelLinear(attn.o_proj, group, sequence_parallel)
    attn.n_heads //= tp
    attn.n_kv_heads //= tp
    mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, group, sequence_parallel)
    mlp.up_proj = ColumnParallelLinear(mlp.up_proj, group, sequence_parallel)
    mlp.down_proj = RowParallelLinear(mlp.down_proj, group, sequence_parallel)
    if sequence_parallel:
        block.input_layernorm = SequenceParallelRMSNorm(block.input_layernorm, group)
        block.post_attention_layernorm = SequenceParallelRMSNorm(block.post_attention_layernorm, group)


def apply_tensor_parallel(model: GPT, dims: ParallelDims, sequence_parallel: bool = False) -> GPT:
    """Shard ``model`` in place over ``dims.tp_group`` and return it.

    Every rank must hold the same full weights (build with the same seed, or load one checkpoint), or
    the model is on the meta device and its shards get their values afterwards (training.build).
    Works on a pipeline stage too: blocks, embedding, norm or unembedding it has deleted are skipped.
    Sizes are checked first, before any module or process group is touched."""
    check_tensor_parallel_sizes(model.config, dims.tp)
    if dims.tp == 1:
        return model  # nothing to split; sequence parallelism over one rank is the plain model
    if any(isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)) for m in model.modules()):
        raise ValueError("apply_tensor_parallel: this model is already tensor-parallel")
    group = dims.tp_group
    for block in [*_children(model, "layers"), *_children(model, "heads")]:
        _parallelize_block(block, dims, sequence_parallel)
    if isinstance(getattr(model, "embed_tokens", None), nn.Embedding):
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, group, sequence_parallel)
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = VocabParallelUnembedding(model.lm_head, group)
    if sequence_parallel:
        if getattr(model, "norm", None) is not None:
            model.norm = SequenceParallelRMSNorm(model.norm, group)  # the heads apply it on T/tp tokens
        model.sequence_gather = SequenceGather(group)
        model.sequence_scatter = SequenceScatter(group)
        model.sequence_shards = dims.tp
    model.tie_weights()  # both vocabulary shards hold the same rows: one Parameter again when tied
    return model


def _children(model: GPT, name: str) -> list[Block]:
    container = getattr(model, name, None)
    return [] if container is None else list(container.values())
