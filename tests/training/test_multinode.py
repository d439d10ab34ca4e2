"""Two torchrun agents on this machine as two "nodes" over loopback, through the real launch script
(examples/launch/multi_node.sh): tp=2 x pp=2 on 4 gloo ranks trains a few steps of the tiny model,
and the checkpoint's DeepSpeed files and layout-free weights come from all four ranks."""

import json
import subprocess

import pytest

from tests.training.launcher import REPO, base_args, metrics, trainer_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_tp2_pp2(tiny_data, tmp_path):
    save = tmp_path / "run"
    args = base_args(tiny_data) + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                   "--global-batch-size", "4", "--micro-batch-size", "1", "--train-iters", "3",
                                   "--save", str(save)]
    port = str(_free_port())
    agents = []
    for node in (0, 1):
        env = dict(trainer_env(tmp_path), NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, NPROC_PER_NODE="2")
        agents.append(subprocess.Popen(["bash", str(REPO / "examples/launch/multi_node.sh"), *args], cwd=REPO,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [a.communicate(timeout=400) for a in agents]
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    assert "tp 2 x cp 1 x pp 2 x dp 1" in outputs[0][0]
    rows = metrics(save)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] == pytest.approx(r["loss_head_1"] + r["loss_head_2"]) for r in rows)
    ckpt = save / "step_00000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["layout"] == {
        "tensor": 2, "pipeline": 2, "data": 1, "zero_stage": 1}
    assert len(list((ckpt / "ds").glob("mp_rank_*_model_states.pt"))) == 4
    assert sorted(p.name for p in (ckpt / "model").glob("*.safetensors")) == [
        "tp00_pp00.safetensors", "tp00_pp01.safetensors", "tp01_pp00.safetensors", "tp01_pp01.safetensors"]
    assert len(list((ckpt / "rng").glob("rank_*.pt"))) == 4
