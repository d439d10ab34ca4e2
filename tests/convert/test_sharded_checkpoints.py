"""Sharded checkpoints merge correctly: the real trainer saves one set of weights in the layouts
tp=1, tp=2, pp=2 and dp=2 with ZeRO-3, and every layout's Hugging Face export equals the tp=1 export
tensor for tensor (the Llama shards and the extra heads).

The tp=1 run trains one step and saves; the other runs ``--load`` that checkpoint, shard the weights in
their own layout (tensor-parallel slices, pipeline stages, ZeRO-3 partitions), run one more real
training step and save. That step uses a learning rate of 1e-30 and no weight decay: every update is
below half an ulp of its weight (|w| ~ 0.02 or 1), so the weights stay bit-identical and what the
runs write went through sharding, a training step and gathering with nothing to blur the comparison."""

import importlib.util
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.training.launcher import REPO, base_args, check, launch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# (name, ranks, tensor, pipeline, ZeRO stage)
LAYOUTS = [("tp2", 2, 2, 1, 1), ("pp2", 2, 1, 2, 1), ("dp2-zero3", 2, 1, 1, 3)]


@pytest.fixture(scope="module")
def layout_data(tmp_path_factory, small_tokenizer_path):
    """(data prefix, tokenizer) for a few hundred kB of the standard library."""
    out = tmp_path_factory.mktemp("layout_data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(stdlib / "json"), str(stdlib / "email"),
                    "--output-prefix", str(out / "data"), "--tokenizer-model", str(small_tokenizer_path),
                    "--append-eod", "--quiet"], cwd=REPO, check=True, capture_output=True)
    return str(out / "data_text_document"), str(small_tokenizer_path)


def export_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_to_hf", REPO / "tools/convert_checkpoint_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def read_export(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export (model shards and mtp_heads.safetensors), by file-independent name."""
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensors[f"{path.name.startswith('mtp_heads')}:{key}"] = fh.get_tensor(key)
    return tensors


def layout_args(tp, pp, zero):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), "--zero-stage", str(zero)]


def test_every_layout_exports_the_tp1_model(layout_data, tmp_path):
    source = tmp_path / "tp1"
    check(launch(1, base_args(layout_data) + ["--train-iters", "1"] + layout_args(1, 1, 1) + ["--save", str(source)],
                 tmp_path))
    frozen = base_args(layout_data) + ["--train-iters", "2", "--lr", "1e-30", "--set", "optimizer.min_lr=0",
                                       "--set", "optimizer.weight_decay=0"]
    export = export_tool()
    # A shard limit of 64 kB splits the Llama weights over several files in every export.
    flags = ["--dtype", "float32", "--max-shard-size-gb", str(64e3 / 2**30)]
    assert export(["--load", str(source), "--save", str(tmp_path / "hf-tp1"), *flags]) == 0
    reference = read_export(tmp_path / "hf-tp1")
    assert len(list((tmp_path / "hf-tp1").glob("model-*-of-*.safetensors"))) > 1
    assert any(k.startswith("True:heads.1.") for k in reference)  # the second head went to mtp_heads

    for name, nproc, tp, pp, zero in LAYOUTS:
        save = tmp_path / name
        proc = launch(nproc, frozen + layout_args(tp, pp, zero) + ["--save", str(save), "--load",
                                                                     str(source / "step_00000001")], tmp_path)
        check(proc)
        assert "resharding" in proc.stdout, name
        ckpt = save / "step_00000002"
        layout = json.loads((ckpt / "trainer_state.json").read_text())["layout"]
        assert layout == {"tensor": tp, "pipeline": pp, "data": nproc // (tp * pp), "zero_stage": zero}
        # Each tensor x pipeline rank wrote its own slices (no gather), and the index says where they go.
        assert sorted(f.name for f in (ckpt / "model").glob("*.safetensors")) == \
            [f"tp{t:02d}_pp{p:02d}.safetensors" for t in range(tp) for p in range(pp)]
        assert export(["--load", str(save), "--save", str(tmp_path / f"hf-{name}"), *flags]) == 0
        exported = read_export(tmp_path / f"hf-{name}")
        assert exported.keys() == reference.keys(), name
        for key, tensor in reference.items():
            assert torch.equal(exported[key], tensor), f"{name}: {key}"
