"""GPT unit tests: shapes, causality, GQA, the n_future label shift, split execution, KV-cache hook."""

import copy
import logging
import math

import pytest
import torch

from megafim.model import GPT, model_config
from megafim.model import layers as model_layers
from tests.model.naive import naive_multi_token_loss

VOCAB = 512


def _model(**overrides):
    torch.manual_seed(0)
    return GPT(model_config("tiny", **overrides))


def _batch(b=2, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, t + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_shapes_and_names():
    model = _model(n_future=3)
    tokens, labels = _batch()
    assert model.logits(tokens).shape == (3, 2, 24, VOCAB)
    assert model.head_hidden(tokens, heads=[2]).shape == (1, 2, 24, 64)
    out = model(tokens, labels)
    assert out.loss.shape == () and out.head_losses.shape == (3,) and out.logits is None
    assert model(tokens).logits.shape == (3, 2, 24, VOCAB)
    names = {n for n, _ in model.named_parameters()}
    assert "layers.2.self_attn.q_proj.weight" in names and "heads.2.mlp.down_proj.weight" in names
    assert "lm_head.weight" in names and "embed_tokens.weight" in names  # untied


def test_future_tokens_do_not_change_past_logits():
    model = _model(n_future=2).eval()
    tokens, _ = _batch(t=20)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % VOCAB
    with torch.no_grad():
        a, b = model.logits(tokens), model.logits(changed)
    torch.testing.assert_close(a[:, :, :12], b[:, :, :12], rtol=0, atol=1e-6)
    assert (a[:, :, 12:] - b[:, :, 12:]).abs().max() > 1e-3  # and the later ones do change


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with 2 kv heads == multi-head attention whose k/v heads are the GQA ones repeated per group."""
    gqa = _model(n_kv_heads=2).eval()
    mha = GPT(model_config("tiny", n_kv_heads=8)).eval()
    state = gqa.state_dict()
    hd, group = 8, 4
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = state[name].view(2, hd, 64)  # (kv heads, hd, d)
            state[name] = w.repeat_interleave(group, dim=0).reshape(8 * hd, 64)
    mha.load_state_dict(state)
    tokens, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(gqa.logits(tokens), mha.logits(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_future", [1, 2, 4])
def test_loss_and_gradients_match_naive_label_shift(n_future):
    model = _model(n_future=n_future)
    tokens, labels = _batch(t=19)
    loss_mask = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    out = model(tokens, labels, loss_mask)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, head_losses = naive_multi_token_loss(model, tokens, labels, loss_mask)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.head_losses, head_losses, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_head_k_is_scored_on_the_token_k_steps_further():
    """Head k at position t is scored on labels[t + k]: labels[0] is head 0's target only."""
    model = _model(n_future=2)
    tokens = torch.full((1, 16), 5)
    mask = torch.zeros(1, 16)
    mask[0, 0] = 1.0
    head_losses = model(tokens, tokens, mask).head_losses
    assert head_losses[0] > 0 and head_losses[1] == 0  # head 1 never sees labels[0]
    mask = torch.zeros(1, 16)
    mask[0, -1] = 1.0  # the last label is head 0's target at t = 15 and head 1's at t = 14
    head_losses = model(tokens, tokens, mask).head_losses
    assert head_losses[0] > 0 and head_losses[1] > 0


def test_pipeline_style_split_equals_whole_model():
    """Two stages that keep disjoint trunk layers (names unchanged) compose to the whole model."""
    model = _model(n_future=2, n_layers=5).eval()
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for key in ["2", "3"]:
        del first.layers[key]
    for key in ["0", "1"]:
        del last.layers[key]
    del first.heads, first.norm, first.lm_head
    del last.embed_tokens
    assert "layers.3.mlp.up_proj.weight" in dict(last.named_parameters())
    tokens, labels = _batch()
    with torch.no_grad():
        whole = model(tokens, labels)
        split_loss, split_heads = last.loss_from_trunk(last.trunk(first.trunk(first.embed(tokens))), labels)
    torch.testing.assert_close(split_loss, whole.loss)
    torch.testing.assert_close(split_heads, whole.head_losses)


def test_activation_checkpointing_gives_the_same_gradients():
    tokens, labels = _batch()
    grads = []
    for ckpt in (False, True):
        model = _model(n_future=2, activation_checkpointing=ckpt)
        model(tokens, labels).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)



def test_fp32_model_trains_under_bf16_autocast():
    """fp32 master weights with bf16 autocast (the usual single-GPU recipe): the fused multi-token loss
    runs its products in bf16 and returns fp32 gradients within bf16's error of the fp32 ones."""
    tokens, labels = _batch()
    model = _model(n_future=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(tokens, labels).loss
    mixed.backward()
    mixed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = model(tokens, labels).loss
    full.backward()
    assert abs(mixed.item() - full.item()) < 1e-2 * full.item()
    for (name, p), g in zip(model.named_parameters(), mixed_grads):
        assert g.dtype == torch.float32, name
        err = ((g - p.grad).abs().max() / p.grad.abs().max()).item()
        assert err < 5e-2, f"{name}: relative error {err:.3g}"

class ConcatCache:
    """The KV-cache protocol in its simplest form (test-side): keep everything, concatenate."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


def test_attention_accepts_a_kv_cache():
    """Prefill 9 tokens, then 1, then 4 at once: logits equal the uncached full forward's."""
    model = _model(n_future=2).eval()
    tokens, _ = _batch(b=2, t=14)
    names = [f"layers.{i}" for i in range(3)] + [f"heads.{k}" for k in range(2)]
    caches = {name: ConcatCache() for name in names}
    with torch.no_grad():
        full = model.logits(tokens)
        parts, pos = [], 0
        for length in (9, 1, 4):
            parts.append(model.logits(tokens[:, pos:pos + length], start_pos=pos, kv_caches=caches))
            pos += length
    torch.testing.assert_close(torch.cat(parts, dim=2), full, rtol=1e-5, atol=1e-5)


def test_init_scales_output_projections():
    model = GPT(model_config("tiny", hidden_size=256, n_heads=8, n_kv_heads=8, ffn_hidden_size=512))
    std = lambda name: dict(model.named_parameters())[name].std().item()  # noqa: E731
    assert std("layers.0.self_attn.q_proj.weight") == pytest.approx(0.02, rel=0.05)
    assert std("layers.0.self_attn.o_proj.weight") == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert std("heads.0.mlp.down_proj.weight") == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_the_cpu_paths_are_logged(caplog):
    model_layers._log_once.cache_clear()
    tokens, _ = _batch(t=4)
    with caplog.at_level(logging.INFO, logger="megafim.model"):
        _model().logits(tokens)
    assert "attention: using torch scaled_dot_product_attention" in caplog.text
    assert "RMSNorm: using torch.nn.functional.rms_norm" in caplog.text


def test_positions_past_max_seq_len_are_an_error():
    model = _model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.logits(torch.zeros(1, 17, dtype=torch.long))
