"""``python -m megafim.evaluate`` scores with the document mask of the checkpoint's run by default;
the flags override it; a malformed setting in the checkpoint is one line and exit 2."""

import json

import numpy as np
import pytest
import torch
import yaml

from megafim.checkpoint.weights import write_weights_checkpoint
from megafim.data.indexed import IndexedDatasetBuilder
from megafim.data.tokenizer import Tokenizer
from megafim.eval.loss import DocumentMask, evaluate_losses
from megafim.evaluate import main
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_tokenizer_path):
    """(tokenizer, model, held-out prefix of short documents, {name: save dir}) where each save holds
    the same weights and a config.yaml whose data section is the name's."""
    tok = Tokenizer.from_file(small_tokenizer_path)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_hidden_size=64, max_seq_len=48, n_future=2)
    model = GPT(config).eval()
    root = tmp_path_factory.mktemp("evaluate_documents")
    prefix = root / "heldout"
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for i in range(30):
            builder.add_document(np.asarray(tok.encode(f"def f{i}(x):\n    return x * {i}\n") + [tok.eod]))
    sections = {"plain": {}, "masked": {"reset_attention_mask": True, "reset_position_ids": True},
                "broken": {"reset_attention_mask": "yes"}}
    saves = {}
    for name, data in sections.items():
        saves[name] = root / name
        write_weights_checkpoint(saves[name], model.state_dict(), config, yaml.safe_dump({"data": data}),
                                 small_tokenizer_path, step=1)
    return tok, model, str(prefix), saves


def _evaluate(capsys, save, prefix, *flags):
    assert main(["--load", str(save), "--data-path", prefix, "--num-samples", "4", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def _expected(tok, model, prefix, mask):
    return evaluate_losses(model, tok, prefix, seq_length=48, num_samples=4, document_mask=mask).as_dict()


def _same(got: dict, want: dict) -> bool:
    """One row of the report: the same token counts, losses within float noise (separately loaded weights)."""
    return got["tokens_per_head"] == want["tokens_per_head"] and \
        got["per_head"] == pytest.approx(want["per_head"], rel=1e-6)


def test_the_checkpoint_settings_are_the_default_and_the_flags_override_them(setup, capsys):
    tok, model, prefix, saves = setup
    masked, plain = DocumentMask(True, True), DocumentMask()
    got = _evaluate(capsys, saves["masked"], prefix)
    assert got["reset_attention_mask"] and got["reset_position_ids"]
    assert _same(got["ar"], _expected(tok, model, prefix, masked)["ar"])
    off = _evaluate(capsys, saves["masked"], prefix, "--no-reset-attention-mask", "--no-reset-position-ids")
    want_plain = _expected(tok, model, prefix, plain)
    assert not off["reset_attention_mask"] and _same(off["ar"], want_plain["ar"])
    assert off["ar"]["tokens"] > got["ar"]["tokens"]  # each document's first token is not scored masked
    assert _same(_evaluate(capsys, saves["plain"], prefix)["ar"], want_plain["ar"])
    on = _evaluate(capsys, saves["plain"], prefix, "--reset-attention-mask")
    assert on["reset_attention_mask"] and not on["reset_position_ids"]
    assert _same(on["ar"], _expected(tok, model, prefix, DocumentMask(True, False))["ar"])


def test_the_table_says_the_documents_are_scored_alone(setup, capsys):
    _, _, prefix, saves = setup
    assert main(["--load", str(saves["masked"]), "--data-path", prefix, "--num-samples", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("documents scored alone (--reset-attention-mask --reset-position-ids)"), first


def test_a_setting_that_is_not_a_boolean_is_one_line_and_exit_2(setup, capsys):
    _, _, prefix, saves = setup
    assert main(["--load", str(saves["broken"]), "--data-path", prefix]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "config.yaml: data.reset_attention_mask is not true or false ('yes')" in err
