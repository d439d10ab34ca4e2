"""Special tokens named by flags (``data.special_tokens``) are saved with the checkpoint: a resume,
inference, evaluation and the export find the same tokens without the flags given again, and an
import named with ``--special-token`` passes them on to the training that continues it."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.data.hf_tokenizer_fixtures import train_byte_level_bpe
from tests.training.launcher import REPO, base_args, check, launch

# Spellings no tokenizer detects by itself: only the names say which token is which.
NAMED = {"fim_prefix": "<|reserved_0|>", "fim_middle": "<|reserved_1|>", "fim_suffix": "<|reserved_2|>",
         "fim_pad": "<|reserved_3|>"}
NAMED_FLOW = "{" + ", ".join(f'{k}: "{v}"' for k, v in NAMED.items()) + "}"


@pytest.fixture(scope="module")
def named_data(tmp_path_factory):
    """(data prefix, tokenizer directory whose FIM tokens have unknown spellings)."""
    from megafim.data.tokenizer_hf import add_fim_tokens

    out = tmp_path_factory.mktemp("named_tokens")
    plain = train_byte_level_bpe(out / "plain.json", "llama3", vocab_size=600)
    tok_dir = add_fim_tokens(plain, out / "tok", NAMED)[0].parent
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(stdlib / "json"), str(stdlib / "email"),
                    "--output-prefix", str(out / "data"), "--tokenizer-model", str(tok_dir), "--append-eod",
                    "--quiet"], cwd=REPO, check=True, capture_output=True)
    return str(out / "data_text_document"), str(tok_dir)


def train_args(named_data, save: Path, iters: int) -> list[str]:
    return base_args(named_data) + ["--train-iters", str(iters), "--fim-rate", "0.5", "--zero-stage", "0",
                                    "--save", str(save), "--save-interval", str(iters)]


def ids_of(tok_dir: str) -> dict[str, int]:
    from megafim.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    assert tok.fim_prefix is None  # unnamed, the tokenizer has no FIM tokens
    return {name: tok.token_id(spelling) for name, spelling in NAMED.items()}


def test_named_tokens_reach_resume_inference_and_export(named_data, tmp_path):
    from megafim.inference.loading import load_model

    data, tok_dir = named_data
    expected = ids_of(tok_dir)
    save = tmp_path / "run"
    check(launch(1, train_args(named_data, save, 2) + ["--set", f"data.special_tokens={NAMED_FLOW}"], tmp_path))

    # Inference / evaluation: the checkpoint's tokenizer comes with the names.
    tok = load_model(save).load_tokenizer()
    assert {name: getattr(tok, name) for name in NAMED} == expected

    # The infill CLI, given no names: its prompt is made of the named tokens.
    (tmp_path / "pre.py").write_text("def f(x):\n    return ")
    (tmp_path / "suf.py").write_text("\n")
    proc = subprocess.run([sys.executable, "-m", "megafim.infill", "--checkpoint", str(save), "--prefix-file",
                           str(tmp_path / "pre.py"), "--suffix-file", str(tmp_path / "suf.py"), "--max-new-tokens",
                           "3", "--json"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["middles"]) == 1

    # Export: transformers' files name the FIM tokens, and megafim reads the export with the names.
    hf = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint_to_hf.py", "--load", str(save), "--save", str(hf)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    special_map = json.loads((hf / "special_tokens_map.json").read_text())
    assert special_map["additional_special_tokens"] == [NAMED[n] for n in ("fim_prefix", "fim_middle",
                                                                           "fim_suffix", "fim_pad")]
    assert json.loads((hf / "megafim_special_tokens.json").read_text())["fim_middle"] == NAMED["fim_middle"]
    tok = load_model(hf).load_tokenizer()
    assert {name: getattr(tok, name) for name in NAMED} == expected

    # Resume with FIM and no names: the checkpoint's are used (unnamed, FIM would be refused) and saved again.
    proc = launch(1, train_args(named_data, save, 4), tmp_path)
    check(proc)
    assert "data.special_tokens:" in proc.stdout + proc.stderr  # the log says where they came from
    saved = yaml.safe_load((save / "step_00000004" / "config.yaml").read_text())
    assert saved["data"]["special_tokens"] == NAMED

    # A resume naming other tokens changes the data: refused unless allowed.
    other = NAMED_FLOW.replace("<|reserved_3|>", "<|end_of_text|>")
    proc = launch(1, train_args(named_data, save, 6) + ["--set", f"data.special_tokens={other}"], tmp_path)
    check(proc, 2)
    assert "data.special_tokens" in proc.stderr and "checkpoint.allow_changes" in proc.stderr


def test_an_import_passes_its_named_tokens_to_the_training_that_continues_it(named_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megafim.training.checkpoint_resume import inherit_special_tokens
    from megafim.training.cli import config_from_args

    data, tok_dir = named_data
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")

    def convert(*extra):
        return subprocess.run([sys.executable, "tools/convert_hf_to_checkpoint.py", "--load", str(tmp_path / "hf"),
                               "--tokenizer-model", tok_dir, *extra], cwd=REPO, capture_output=True, text=True)

    proc = convert("--save", str(tmp_path / "bad"), "--special-token", "fim_pad=<|nope|>")
    assert proc.returncode == 2 and "no token '<|nope|>' (named as fim_pad)" in proc.stderr
    assert not (tmp_path / "bad").exists()
    proc = convert("--save", str(tmp_path / "imported"), *[f"--special-token={k}={v}" for k, v in NAMED.items()])
    assert proc.returncode == 0, proc.stderr

    cfg, _ = config_from_args(base_args((data, tok_dir)) + ["--load", str(tmp_path / "imported")])
    notes: list[str] = []
    inherit_special_tokens(cfg, notes)
    assert cfg.data.special_tokens == NAMED and str(tmp_path / "imported") in notes[0]
    cfg, _ = config_from_args(base_args((data, tok_dir)) + ["--set", "data.special_tokens={eod: <|end_of_text|>}",
                                                            "--load", str(tmp_path / "imported")])
    inherit_special_tokens(cfg, [])
    assert cfg.data.special_tokens == {"eod": "<|end_of_text|>"}  # this run's own names win


def test_a_resume_compares_a_tokenizer_directory_by_its_tokenizer_json(named_data, tmp_path):
    """The checkpoint keeps a directory's tokenizer.json: a resume with another directory is refused
    (a directory was not compared before), the same one passes."""
    from megafim.checkpoint import compat
    from megafim.model.config import ModelConfig

    _, tok_dir = named_data
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    (ckpt / "tokenizer.model").write_bytes((Path(tok_dir) / "tokenizer.json").read_bytes())
    cfg = {"data": {"tokenizer_model": tok_dir}}
    assert compat.compare(ckpt, ModelConfig(), ModelConfig(), cfg, cfg, True, []) == (None, [])
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text((Path(tok_dir) / "tokenizer.json").read_text().replace("reserved_3", "reserved_9"))
    refused, _ = compat.compare(ckpt, ModelConfig(), ModelConfig(), cfg, {"data": {"tokenizer_model": str(other)}},
                                True, [])
    assert refused and refused.startswith(f"data.tokenizer_model: {other} differs from the checkpoint's")
