"""A model trained on real code (not random weights) agrees with its Hugging Face export on real text:
fp32 logits within 1e-4 and the same greedy continuation from HF ``generate`` as from ours.

Random weights give flat logits where a mismatch in rotary, norm or GQA layout can hide; a trained
model's logits are peaked and its greedy path depends on them."""

import sysconfig
from pathlib import Path

import pytest
import torch

from megafim.convert.hf_model import megafim_to_hf
from megafim.convert.hf_tokenizer import save_hf_tokenizer
from megafim.data.tokenizer import Tokenizer
from megafim.inference.generate import generate
from megafim.inference.sampling import SamplingConfig
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT

transformers = pytest.importorskip("transformers")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def trained(small_tokenizer_path, tmp_path_factory):
    tok = Tokenizer.from_file(small_tokenizer_path)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((STDLIB / "json").glob("*.py")))
    ids = torch.tensor(tok.encode(text))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_hidden_size=128, max_seq_len=128, n_future=2)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g).tolist()
        window = torch.stack([ids[s:s + 65] for s in starts])
        loss = model(window[:, :-1], window[:, 1:]).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 2.0  # it learned something (sum over 2 heads)
    out = tmp_path_factory.mktemp("trained_hf")
    megafim_to_hf(model.state_dict(), config, out, dtype="float32", eos_token_id=tok.eod)
    save_hf_tokenizer(tok, out)
    return model.eval(), tok, out


def test_logits_and_greedy_continuation_on_real_code(trained):
    model, tok, out = trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")[:3000]  # not in the training text
    ids = hf_tok(text, add_special_tokens=False)["input_ids"][:120]
    assert ids == tok.encode(text)[:120]
    with torch.no_grad():
        ours = model.logits(torch.tensor([ids]), heads=[0])[0]
        theirs = hf(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.std().item() > 1.0  # peaked logits: a trained model, not a flat random one
    for start in (0, 40, 80):
        prompt = ids[start:start + 24]
        mine = generate(model, prompt, SamplingConfig(max_new_tokens=24))[0]
        with torch.no_grad():
            hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.fim_pad)[0, len(prompt):].tolist()
        assert mine == hf_out, start
