"""The real trainer continues from imported Qwen2 and Llama 3.1 models under tp = 2, pp = 2 and ZeRO-3.

Each import (tied Qwen2 with q/k/v biases; untied Llama 3.1 with llama3 RoPE scaling) gets a second,
new head and trains with the learning rate at 1e-30: every update is below half an ulp, so the
losses of the layouts must agree (same batches, same weights) and the export after the step must be
the imported Hugging Face model again, tensor for tensor: biases, tied or untied embeddings and the
RoPE settings all went through resharding, a training step and gathering."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.launcher import REPO, check, launch, metrics

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SHAPE = dict(vocab_size=1280, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory, small_tokenizer_path):
    out = tmp_path_factory.mktemp("import_data")
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input",
                    str(Path(sysconfig.get_paths()["stdlib"]) / "json"), "--output-prefix", str(out / "data"),
                    "--tokenizer-model", str(small_tokenizer_path), "--append-eod", "--quiet"],
                   cwd=REPO, check=True, capture_output=True)
    return str(out / "data_text_document"), str(small_tokenizer_path)


def import_hf(config, tmp_path: Path) -> tuple[Path, Path]:
    """Save a random HF model and import it with a second head; (HF dir, megafim save dir)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "hf")
    subprocess.run([sys.executable, "tools/convert_hf_to_checkpoint.py", "--load", str(tmp_path / "hf"),
                    "--save", str(tmp_path / "imported"), "--n-future", "2"], cwd=REPO, check=True,
                   capture_output=True)
    return tmp_path / "hf", tmp_path / "imported"


def train_args(imported: Path, data, tp: int, pp: int, save: Path, zero: int = 1) -> list[str]:
    prefix, tok = data
    return ["--config", str(imported / "step_00000000" / "config.yaml"), "--load", str(imported),
            "--data-path", prefix, "--tokenizer-model", tok, "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-30", "--set", "optimizer.min_lr=0",
            "--set", "optimizer.weight_decay=0", "--set", "schedule.warmup_iters=0", "--set",
            "logging.tensorboard=false", "--set", "schedule.eval_interval=0", "--set", "data.fim.rate=0.5",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--zero-stage", str(zero), "--save", str(save)]


def exported_equals_hf(save: Path, hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / f"export-{save.name}"
    result = subprocess.run([sys.executable, "tools/convert_checkpoint_to_hf.py", "--load", str(save),
                             "--save", str(out), "--dtype", "float32"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    original = load_file(str(hf_dir / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    for field in ("rope_parameters", "tie_word_embeddings", "model_type"):
        assert json.loads((out / "config.json").read_text())[field] == \
            json.loads((hf_dir / "config.json").read_text())[field], field


@pytest.mark.parametrize("name", ["qwen2-tied", "llama3.1"])
def test_layouts_train_an_import_alike_and_give_it_back(name, data, tmp_path):
    if name == "qwen2-tied":
        # (ranks, tp, pp, ZeRO stage); dp = 2 with ZeRO-3 partitions the one tied Parameter
        config = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True)
        layouts = [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 1, 3)]
    else:
        config = transformers.LlamaConfig(**SHAPE, rope_parameters=LLAMA31_ROPE)
        layouts = [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 2, 1)]
    hf_dir, imported = import_hf(config, tmp_path)
    losses = {}
    for nproc, tp, pp, zero in layouts:
        save = tmp_path / f"n{nproc}tp{tp}pp{pp}z{zero}"
        proc = launch(nproc, train_args(imported, data, tp, pp, save, zero), tmp_path)
        check(proc)
        assert "resharding" in proc.stdout
        losses[save.name] = [r[k] for r in metrics(save) for k in ("loss_head_1", "loss_head_2")]
        exported_equals_hf(save, hf_dir, tmp_path)
    reference = losses.pop("n1tp1pp1z1")
    assert len(reference) == 2 and all(2 < loss < 12 for loss in reference)
    for layout, got in losses.items():
        assert got == pytest.approx(reference, rel=1e-5), layout


def test_tied_embeddings_with_pipeline_stages_are_refused_before_any_process_group(data, tmp_path):
    from megafim.training.cli import config_from_args
    from megafim.training.config import ConfigError
    from megafim.training.loop import check_before_groups

    hf_dir, imported = import_hf(transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True), tmp_path)
    cfg, _ = config_from_args(train_args(imported, data, 1, 2, tmp_path / "run"))
    refusal = "tie_embeddings = true with parallel.pipeline = 2 .*--untie-embeddings"
    with pytest.raises(ConfigError, match=refusal):
        check_before_groups(cfg, 2)
    untied = tmp_path / "untied"
    subprocess.run([sys.executable, "tools/convert_hf_to_checkpoint.py", "--load", str(hf_dir), "--save",
                    str(untied), "--untie-embeddings"], cwd=REPO, check=True, capture_output=True)
    cfg, _ = config_from_args(train_args(untied, data, 1, 2, tmp_path / "run"))
    assert not check_before_groups(cfg, 2)[1].tie_embeddings
