"""The Llama-style GPT with n future-token heads (Gloeckle et al. 2024), in plain PyTorch.

    tokens -> embed_tokens -> layers.0 .. layers.{n_layers-2}   (the trunk)
           -> heads.k  (one Block each, k = 0 .. n_future-1)
           -> norm (shared) -> lm_head (shared; the embedding itself with tie_embeddings)

Head k predicts token t+k+1. ``layers`` and ``heads`` are ModuleDicts keyed by index, so a pipeline
stage that deletes the layers it does not run keeps the others' parameter names. No process groups
live here: tensor parallelism swaps modules from outside (``megafim.parallel``), and the two
``sequence_*`` modules are the hooks sequence parallelism fills (identities otherwise).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megafim.model.attention import Attention, KVCache
from megafim.model.config import ModelConfig
from megafim.model.documents import Documents, TokenLayout, token_layout
from megafim.model.layers import RMSNorm, SwiGLU, rotary_cos_sin
from megafim.ops.multi_token_loss import (HeadTargets, PartitionedParamsFactory, head_targets,
                                         multi_token_loss_for_targets)


def initial_value(config: ModelConfig, name: str, shape: Sequence[int], init_seed: int) -> Tensor:
    """The initial value (float32, full size) of the whole model's parameter ``name``.

    Norms' scales are ones; every other weight is normal(0, init_std), and the projections that write
    into the residual stream (o_proj, down_proj) get init_std / sqrt(2 n_layers), so that the stream's
    variance does not grow with depth (GPT-2). Each parameter draws from a generator of its own, seeded
    by (init_seed, name): a pipeline stage or a tensor-parallel shard is made without making the rest
    of the model, and every layout starts from the same weights."""
    if name.endswith("norm.weight"):
        return torch.ones(tuple(shape))
    if name.endswith(".bias"):  # the q/k/v biases (ModelConfig.qkv_bias) start at zero
        return torch.zeros(tuple(shape))
    std = config.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * config.n_layers)
    digest = hashlib.blake2b(f"{init_seed}:{name}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.empty(tuple(shape)).normal_(0.0, std, generator=generator)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``; HF Llama names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None,
                layout: TokenLayout | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layout)  # (B, T, d)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class GPTOutput:
    """With labels: ``loss`` (sum of the heads' masked mean cross-entropies, differentiable) and
    ``head_losses`` (n_future,), detached; ``logits`` is None (the fused loss never materialises them).
    Without labels: ``logits`` (n_future, B, T, V) and the losses are None."""

    loss: Tensor | None = None
    head_losses: Tensor | None = None
    logits: Tensor | None = None


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Drawn first, from the global generator: torch.manual_seed(s) before GPT(config) decides every
        # weight, whether the model is built on the meta device (training.build) or not.
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(config) for i in range(config.n_trunk_layers)})
        self.heads = nn.ModuleDict({str(k): Block(config) for k in range(config.n_future)})
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self._register_load_state_dict_pre_hook(self._fill_tied_unembedding)
        self.register_load_state_dict_post_hook(lambda module, _: module.tie_weights())
        # Sequence-parallel hooks (megafim.parallel fills them): gather (B, T/tp, d) -> (B, T, d) and
        # scatter back; ``sequence_shards`` is tp then, so the trunk knows the full length.
        self.sequence_gather: nn.Module = nn.Identity()
        self.sequence_scatter: nn.Module = nn.Identity()
        self.sequence_shards = 1
        # Parameters partitioned outside their module's forward (ZeRO-3; megafim.parallel.zero3 fills it):
        # finds and gathers those the loss uses (megafim.ops.multi_token_loss.PartitionedParams).
        self.partitioned_params: PartitionedParamsFactory | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter to ``initial_value`` (nothing to do on the meta device)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if not param.is_meta:
                    param.copy_(initial_value(self.config, name, param.shape, self.init_seed))

    def tie_weights(self) -> None:
        """With ``tie_embeddings``, make ``lm_head`` hold the embedding's Parameter (again: leaving the
        meta device, tensor parallelism and ``load_state_dict(assign=True)`` make new Parameters). A
        pipeline stage that holds only one of the two has nothing to tie."""
        if self.config.tie_embeddings and hasattr(self, "embed_tokens") and hasattr(self, "lm_head"):
            self.lm_head.weight = self.embed_tokens.weight

    def _fill_tied_unembedding(self, state, prefix, *_) -> None:
        """A tied model's state may name only the embedding (``named_parameters`` lists a shared
        Parameter once, so checkpoints hold it once): the unembedding is the same tensor."""
        embed, head = prefix + "embed_tokens.weight", prefix + "lm_head.weight"
        if self.config.tie_embeddings and embed in state and head not in state:
            state[head] = state[embed]

    def compile_blocks(self) -> None:
        """``torch.compile`` every transformer block in place (torchtitan's per-block recipe): the
        blocks are where the time goes, and their norms, rotary embedding and SwiGLU fuse into a few
        kernels. Parameter names do not change. The fused loss (its own Triton kernel, with the
        heads' backward inside an autograd Function) is left eager."""
        for block in [*self.layers.values(), *self.heads.values()]:
            block.compile()

    # -- pieces the trainer (pipeline stages) and inference call separately --------------------------

    def rope(self, seq_len: int, start_pos: int = 0,
             device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Rotary cos/sin (T, hd) for positions start_pos .. start_pos + seq_len - 1."""
        if start_pos + seq_len > self.config.max_seq_len:
            raise ValueError(f"GPT: positions up to {start_pos + seq_len} exceed ModelConfig.max_seq_len = "
                             f"{self.config.max_seq_len}")
        positions = torch.arange(start_pos, start_pos + seq_len, device=device)
        c = self.config
        return rotary_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)

    def rope_for(self, seq_len: int, layout: TokenLayout | None, start_pos: int = 0,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Rotary tables: (T, hd) of ``rope`` without a layout, else (B, T, hd) of its positions."""
        if layout is None:
            return self.rope(seq_len, start_pos, device)
        positions = layout.rope_positions
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"GPT: positions up to {int(positions.max()) + 1} exceed ModelConfig.max_seq_len = "
                             f"{self.config.max_seq_len}")
        cos, sin = rotary_cos_sin(positions.reshape(-1), self.config.head_dim, self.config.rope_theta)
        return cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) int -> (B, T, d) (this rank's (B, T/tp, d) under sequence parallelism)."""
        return self.embed_tokens(tokens)

    def trunk(self, h: Tensor, *, start_pos: int = 0, kv_caches: Mapping[str, KVCache] | None = None,
              layout: TokenLayout | None = None) -> Tensor:
        """Run whichever trunk layers this module holds, in index order. h (B, T, d) -> (B, T, d).

        kv_caches maps a block's name (``"layers.3"``) to its cache; absent names run without one.
        ``layout`` (``token_layout``): packed documents and/or this rank's share of the sequence."""
        cos, sin = self.rope_for(h.shape[1] * self.sequence_shards, layout, start_pos, h.device)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for key, layer in self.layers.items():
            cache = None if kv_caches is None else kv_caches.get(f"layers.{key}")
            if recompute and cache is None:
                h = checkpoint(layer, h, cos, sin, None, layout, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, layout)
        return h

    def head_fns(self, seq_len: int, *, heads: Sequence[int] | None = None, start_pos: int = 0,
                 kv_caches: Mapping[str, KVCache] | None = None, device: torch.device | None = None,
                 layout: TokenLayout | None = None) -> list[Callable[[Tensor], Tensor]]:
        """One callable per head k (all, or those listed): full trunk output (B, T, d) -> head block ->
        shared final norm, (B, T, d). These are the ``heads`` that ``multi_token_loss`` runs one by one."""
        cos, sin = self.rope_for(seq_len, layout, start_pos, device)

        def run(k: int, h: Tensor) -> Tensor:
            cache = None if kv_caches is None else kv_caches.get(f"heads.{k}")
            h = self.heads[str(k)](self.sequence_scatter(h), cos, sin, cache, layout)
            return self.sequence_gather(self.norm(h))

        selected = range(len(self.heads)) if heads is None else heads
        return [lambda h, k=k: run(k, h) for k in selected]

    def targets(self, labels: Tensor, loss_mask: Tensor | None = None,
                documents: Documents | None = None) -> HeadTargets:
        """Every head's targets (``head_targets``): labels (B, T) are next-token labels, head k is
        scored on labels[t + k], weighted by loss_mask[t + k] (default ones); under a document mask a
        label in a later document than its position is dropped."""
        masked = documents is not None and documents.mask_attention
        return head_targets(labels, None if loss_mask is None else loss_mask.float(), self.config.n_future,
                            segment_ids=documents.segment_ids if masked else None,
                            label_segment_ids=documents.label_segment_ids if masked else None)

    def loss_from_trunk(self, h: Tensor, labels: Tensor | HeadTargets, loss_mask: Tensor | None = None, *,
                        layout: TokenLayout | None = None) -> tuple[Tensor, Tensor]:
        """The last pipeline stage's part: trunk output -> (loss, head_losses (n_future,)).

        ``labels``: next-token labels (B, T) with their ``loss_mask`` (see ``targets``), or the
        ``HeadTargets`` of this rank's positions. ``layout``: as given to ``trunk``."""
        hidden = self.sequence_gather(h)  # (B, T, d) on every tensor-parallel rank
        targets = labels if isinstance(labels, HeadTargets) else self.targets(labels, loss_mask)
        params = list({id(p): p for p in [*self.heads.parameters(), *self.norm.parameters()]}.values())
        return multi_token_loss_for_targets(
            hidden, self.head_fns(hidden.shape[1], device=hidden.device, layout=layout), params,
            self.lm_head.weight, targets,
            # a vocab-parallel lm_head (megafim.parallel) carries its group and first row; plain: None, 0
            tp_group=getattr(self.lm_head, "process_group", None),
            vocab_start=getattr(self.lm_head, "vocab_start", 0),
            partitioned=self.partitioned_params,
        )

    # -- whole-model entry points ---------------------------------------------------------------------

    def head_hidden(self, tokens: Tensor, *, heads: Sequence[int] | None = None, start_pos: int = 0,
                    kv_caches: Mapping[str, KVCache] | None = None) -> Tensor:
        """Final-normed hidden states of the chosen heads (all by default): (n, B, T, d)."""
        h = self.sequence_gather(self.trunk(self.embed(tokens), start_pos=start_pos, kv_caches=kv_caches))
        fns = self.head_fns(h.shape[1], heads=heads, start_pos=start_pos, kv_caches=kv_caches,
                            device=h.device)
        return torch.stack([fn(h) for fn in fns])

    def logits(self, tokens: Tensor, *, heads: Sequence[int] | None = None, start_pos: int = 0,
               kv_caches: Mapping[str, KVCache] | None = None) -> Tensor:
        """Logits of the chosen heads (all by default): (n, B, T, V); head k's row t scores token t+k+1."""
        return self.lm_head(self.head_hidden(tokens, heads=heads, start_pos=start_pos, kv_caches=kv_caches))

    def forward(self, tokens: Tensor, labels: Tensor | None = None, loss_mask: Tensor | None = None, *,
                documents: Documents | None = None) -> GPTOutput:
        """tokens (B, T). With labels (B, T): the multi-token loss; without: every head's logits.
        ``documents``: the packed documents of the batch (attention mask, positions, labels)."""
        if labels is None:
            if documents is not None:
                raise ValueError("GPT.forward: documents are used with labels (training) only")
            return GPTOutput(logits=self.logits(tokens))
        layout = None if documents is None else token_layout(documents, tokens.shape[1], device=tokens.device)
        targets = self.targets(labels, loss_mask, documents)
        loss, head_losses = self.loss_from_trunk(self.trunk(self.embed(tokens), layout=layout), targets,
                                                 layout=layout)
        return GPTOutput(loss=loss, head_losses=head_losses)
