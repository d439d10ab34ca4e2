"""The conversion tools and the infill / evaluate CLIs, run as a user runs them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megafim.data.indexed import IndexedDatasetBuilder
from megafim.data.tokenizer import Tokenizer
from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.weights import write_weights_checkpoint
from megafim.inference.loading import load_model
from megafim.model.config import ModelConfig
from megafim.model.gpt import GPT

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizer_path):
    """A save directory in the trainer's layout holding a random 2-head model."""
    tok = Tokenizer.from_file(small_tokenizer_path)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_hidden_size=64, max_seq_len=96, n_future=2)
    model = GPT(config)
    save = tmp_path_factory.mktemp("ckpt") / "save"
    write_weights_checkpoint(save, model.state_dict(), config, yaml.safe_dump({"data": {}}),
                             small_tokenizer_path, step=7)
    return save, model, tok


def test_export_import_round_trip_and_new_heads(checkpoint, tmp_path):
    save, model, tok = checkpoint
    hf_dir = tmp_path / "hf"
    run("tools/convert_checkpoint_to_hf.py", "--load", save, "--save", hf_dir, "--dtype", "float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "def f(x):\n    return [x, {'a': 1}]\n"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert (hf(ids).logits - model.eval().logits(ids, heads=[0])[0]).abs().max() < 1e-4

    back = tmp_path / "back"
    run("tools/convert_hf_to_checkpoint.py", "--load", hf_dir, "--save", back)
    loaded = load_model(back)
    assert loaded.model.config == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], t), name
    assert Path(loaded.tokenizer_path).read_bytes() == Path(tok.model_path).read_bytes()

    four = tmp_path / "four"
    run("tools/convert_hf_to_checkpoint.py", "--load", hf_dir, "--save", four, "--n-future", "4", "--init-heads", "copy")
    m4 = load_model(four).model.state_dict()
    assert torch.equal(m4["heads.3.mlp.down_proj.weight"], m4["heads.0.mlp.down_proj.weight"])
    assert torch.equal(m4["heads.1.mlp.down_proj.weight"], model.state_dict()["heads.1.mlp.down_proj.weight"])


def _fails(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_converters_never_overwrite_a_run_or_leave_stale_shards(checkpoint, tmp_path):
    save, model, tok = checkpoint
    hf_dir = tmp_path / "hf"
    big = ["--dtype", "float32", "--max-shard-size-gb", str(8e3 / 2**30)]  # many small shards
    run("tools/convert_checkpoint_to_hf.py", "--load", save, "--save", hf_dir, *big)
    many = sorted(p.name for p in hf_dir.glob("model-*.safetensors"))
    assert len(many) > 2
    # Importing into a directory that holds a run would repoint its `latest` to step 0: refused.
    message = _fails("tools/convert_hf_to_checkpoint.py", "--load", hf_dir, "--save", save)
    assert str(save) in message and "already holds a run" in message
    assert (save / "latest").read_text().strip() == "step_00000007"
    # Exporting into a non-empty directory: refused, or with --overwrite the old shards go first.
    assert "not empty" in _fails("tools/convert_checkpoint_to_hf.py", "--load", save, "--save", hf_dir)
    run("tools/convert_checkpoint_to_hf.py", "--load", save, "--save", hf_dir, "--overwrite", "--dtype", "float32")
    assert not [p for p in hf_dir.glob("model-*.safetensors")]  # one file now, none of the old shards
    assert (hf_dir / "model.safetensors").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert torch.equal(hf.state_dict()["model.embed_tokens.weight"], model.state_dict()["embed_tokens.weight"])


def test_export_refuses_a_corrupt_checkpoint_naming_the_file(checkpoint, tmp_path):
    save, _, _ = checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(save, copy)
    shard = copy / "step_00000007" / "model" / "tp00_pp00.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    message = _fails("tools/convert_checkpoint_to_hf.py", "--load", copy, "--save", tmp_path / "hf")
    assert "tp00_pp00.safetensors: checksum" in message
    with pytest.raises(CheckpointError, match=r"tp00_pp00\.safetensors: checksum"):
        load_model(copy)  # inference and evaluation
    assert load_model(copy, verify=False).kind == "megafim"  # the flipped bit is a valid float


def test_infill_and_evaluate_clis(checkpoint, tmp_path):
    save, model, tok = checkpoint
    (tmp_path / "pre.py").write_text("def add(a, b):\n    return ")
    (tmp_path / "suf.py").write_text("\n\nprint(add(1, 2))\n")
    out = json.loads(run("-m", "megafim.infill", "--checkpoint", save, "--prefix-file", tmp_path / "pre.py",
                         "--suffix-file", tmp_path / "suf.py", "--mode", "spm", "--max-new-tokens", "5", "--json"))
    assert out["mode"] == "spm" and len(out["middles"]) == 1

    prefix = tmp_path / "heldout"
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for i in range(30):
            builder.add_document(np.asarray(tok.encode(f"def f{i}(x):\n    return x * {i}\n") + [tok.eod]))
    report = json.loads(run("-m", "megafim.evaluate", "--load", save, "--data-path", prefix, "--seq-length", "48",
                            "--num-samples", "4", "--json"))
    assert report["samples"] == 4 and report["n_future"] == 2
    assert report["middle_ar"]["tokens"] == report["middle_psm"]["tokens"] > 0

    bad = subprocess.run([sys.executable, "-m", "megafim.evaluate", "--load", tmp_path / "nothing", "--data-path",
                          prefix], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "no such file" in bad.stderr

    # The default scores at most DEFAULT_NUM_SAMPLES contexts (this set has fewer), 0 all of them; no bar
    # when stderr is not a terminal, a tqdm bar when it is.
    default = json.loads(run("-m", "megafim.evaluate", "--load", save, "--data-path", prefix, "--seq-length", "48",
                             "--json"))
    every = json.loads(run("-m", "megafim.evaluate", "--load", save, "--data-path", prefix, "--seq-length", "48",
                           "--num-samples", "0", "--json"))
    assert 4 < default["samples"] == every["samples"] <= 256
    import fcntl
    import pty
    import select
    import struct
    import termios
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm needs a width
    cmd = [sys.executable, "-m", "megafim.evaluate", "--load", save, "--data-path", prefix, "--seq-length", "48",
           "--num-samples", "4"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    shown = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=follower, text=True, env=env)
    bar = b""
    while select.select([leader], [], [], 1.0)[0]:
        bar += os.read(leader, 1 << 16)
    os.close(follower)
    os.close(leader)
    bar = bar.decode(errors="replace")
    assert shown.returncode == 0 and "evaluate:" in bar and "/12 " in bar  # 3 passes x 4 contexts
    quiet = subprocess.run(cmd + ["--no-progress"], cwd=REPO, capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and "evaluate:" not in quiet.stderr and "ctx" not in quiet.stderr


def test_humaneval_generates_from_a_megafim_checkpoint(checkpoint, tmp_path):
    save, _, _ = checkpoint
    out = tmp_path / "samples.jsonl"  # the benchmark data installed with megafim
    report = json.loads(run("-m", "megafim.eval.humaneval_infilling", "--load", save,
                            "--limit", "2", "--num-samples", "2", "--max-new-tokens", "6", "--k", "1",
                            "--output", out, "--workers", "2", "--json"))
    assert len(out.read_text().splitlines()) == 4  # 2 tasks x 2 samples, scored (a random model fails them)
    assert "pass@1" in json.dumps(report)
