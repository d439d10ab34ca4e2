"""CUDA fast paths (flash-attn, apex RMSNorm) against the torch paths; skipped without a GPU."""

import pytest
import torch

from megafim.model import GPT, model_config
from megafim.model import attention as attention_module
from megafim.model import layers as layers_module

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _logits(model, tokens):
    with torch.no_grad():
        return model.logits(tokens).float()


def test_cuda_model_matches_the_cpu_model_in_fp32():
    torch.manual_seed(0)
    model = GPT(model_config("tiny", n_future=2)).eval()
    tokens = torch.randint(0, 512, (2, 64))
    expected = _logits(model, tokens)
    torch.testing.assert_close(_logits(model.cuda(), tokens.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [8, 2])
def test_fast_paths_match_the_torch_paths_in_bf16(monkeypatch, n_kv_heads):
    """Whatever fast paths are installed (flash-attn, apex) against SDPA + torch rms_norm."""
    torch.manual_seed(0)
    model = GPT(model_config("tiny", n_future=2, n_kv_heads=n_kv_heads, hidden_size=128, n_heads=8))
    model = model.eval().cuda().to(torch.bfloat16)
    tokens = torch.randint(0, 512, (2, 128), device="cuda")
    fast = _logits(model, tokens)
    monkeypatch.setattr(attention_module, "_flash_attn_func", lambda: None)
    monkeypatch.setattr(layers_module, "_apex_rms_norm", lambda: None)
    slow = _logits(model, tokens)
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n_kv_heads", [8, 2])
def test_document_attention_varlen_matches_the_masked_sdpa_in_bf16(monkeypatch, n_kv_heads):
    """flash-attn's variable-length kernels (when installed) against SDPA with the document mask."""
    from megafim.model.documents import Documents, token_layout

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, n, 16, generator=g).cuda().to(torch.bfloat16) for n in (8, n_kv_heads, n_kv_heads))
    seg = torch.tensor([[0] * 30 + [1] * 50 + [2] * 16, [0] * 7 + [1] * 89]).cuda()
    layout = token_layout(Documents(seg, seg), 96, device=torch.device("cuda"))
    fast = attention_module.document_attention(q, k, v, layout).float()
    monkeypatch.setattr(attention_module, "_flash_attn_varlen_func", lambda: None)
    slow = attention_module.document_attention(q, k, v, layout).float()
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)
