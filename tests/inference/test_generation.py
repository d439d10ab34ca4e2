"""Generation with a KV cache, sampling, infilling and self-speculative decoding."""

import pytest
import torch

from megafim.data.tokenizer import Tokenizer
from megafim.inference.generate import generate
from megafim.inference.infill import SpmInfillSession, fim_prompt, infill
from megafim.inference.sampling import SamplingConfig, top_p_filter
from megafim.inference.speculative import speculative_generate
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT


def tiny_model(n_future=1, vocab=97, seed=0, max_seq_len=128) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_hidden_size=64, max_seq_len=max_seq_len, n_future=n_future)
    return GPT(config).double().eval()


def greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = model.logits(torch.tensor([ids]), heads=[0])[0, 0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("n_future", [1, 2])
def test_cached_greedy_equals_recomputing_everything(n_future):
    model = tiny_model(n_future)
    prompt = [5, 17, 3, 88, 42]
    out = generate(model, prompt, SamplingConfig(max_new_tokens=20))[0]
    assert out == greedy_without_cache(model, prompt, 20)


def test_stop_ids_and_context_limit():
    model = tiny_model(max_seq_len=16)
    prompt = [1, 2, 3]
    free = generate(model, prompt, SamplingConfig(max_new_tokens=50))[0]
    assert len(free) == 16 - len(prompt)  # capped by the model's context
    stop = free[4]
    stopped = generate(model, prompt, SamplingConfig(max_new_tokens=50), stop_ids={stop})[0]
    assert stopped == free[: free.index(stop) + 1]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, list(range(16)), SamplingConfig())


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    model = tiny_model()
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3)
    a = generate(model, [4, 5], cfg, num_samples=3)
    assert a == generate(model, [4, 5], cfg, num_samples=3)
    assert len(a) == 3 and all(len(r) == 12 for r in a)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("n_future", [1, 2, 4])
def test_speculative_equals_greedy_on_a_random_model(n_future):
    model = tiny_model(n_future, seed=n_future)
    prompt = [7, 1, 9, 60, 2, 33]
    out, stats = speculative_generate(model, prompt, 30)
    assert out == generate(model, prompt, SamplingConfig(max_new_tokens=30))[0]
    assert stats.tokens == 30 and stats.forward_passes <= 30


def test_speculative_drafts_are_accepted_once_the_heads_have_learned():
    """Train a 4-head model on a periodic sequence: the extra heads learn it, drafts get accepted."""
    model = tiny_model(n_future=4, vocab=16, seed=0).float().train()
    period = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    seq = period.repeat(6)[:65]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(seq[None, :-1], seq[None, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompt = period.tolist()
    out, stats = speculative_generate(model, prompt, 40)
    assert out == generate(model, prompt, SamplingConfig(max_new_tokens=40))[0]
    assert out[:24] == period.repeat(2).tolist()
    assert stats.acceptance_rate > 0.8 and stats.tokens_per_pass > 3


def test_infill_prompt_formats_and_spm_session_reuses_the_suffix_cache(small_tokenizer_path):
    tok = Tokenizer.from_file(small_tokenizer_path)
    pre, suf = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"
    psm = fim_prompt(tok, pre, suf, "psm")
    spm = fim_prompt(tok, pre, suf, "spm")
    assert psm == [tok.fim_prefix, *tok.encode(pre), tok.fim_suffix, *tok.encode(suf), tok.fim_middle]
    assert spm == [tok.fim_prefix, tok.fim_suffix, *tok.encode(suf), tok.fim_middle, *tok.encode(pre)]
    with pytest.raises(ValueError, match="mode"):
        fim_prompt(tok, pre, suf, "pms")
    p_ids, s_ids = tok.encode(pre), tok.encode(suf)
    short = fim_prompt(tok, pre, suf, "psm", max_tokens=9)  # room for 6 of the parts' tokens: 3 + 3
    assert short == [tok.fim_prefix, *p_ids[-3:], tok.fim_suffix, *s_ids[:3], tok.fim_middle]
    assert fim_prompt(tok, "", suf, "spm", max_tokens=9) == [tok.fim_prefix, tok.fim_suffix, *s_ids[:6], tok.fim_middle]

    model = tiny_model(vocab=tok.vocab_size, max_seq_len=256)
    sampling = SamplingConfig(max_new_tokens=8)
    session = SpmInfillSession(model, tok, suf, sampling)
    first = session.complete(pre)
    assert first == infill(model, tok, pre, suf, mode="spm", sampling=sampling)[0]
    assert session.last_reused == 0
    longer = pre + " a + b"
    second = session.complete(longer)
    assert second == infill(model, tok, longer, suf, mode="spm", sampling=sampling)[0]
    # everything up to the edited word of the prefix came from the cache: the suffix and most of the prefix
    assert session.last_reused >= 3 + len(tok.encode(suf)) + len(tok.encode(pre)) - 2
