"""Exact resume: 2N steps straight == N steps, save, resume, N steps (fp32 on the CPU, bit-identical
losses, per-head losses and gradient norms), for the layouts and ZeRO stages the trainer supports;
and a checkpoint of one layout loaded into another (resharded weights)."""

import json

import pytest

from tests.training.launcher import base_args, check, launch, metrics

N = 2
KEYS = ("loss", "loss_head_1", "loss_head_2", "grad_norm", "lr", "consumed_samples")

# (ranks, tensor, pipeline, ZeRO stage): one rank per stage 0..3 would cost four launches more; the
# ZeRO stages are spread over the layouts instead (ZeRO-3 with pp > 1 is refused, see test_cli_errors).
LAYOUTS = [
    pytest.param(1, 1, 1, 0, id="1rank-zero0"),
    pytest.param(2, 1, 1, 3, id="dp2-zero3"),
    pytest.param(2, 2, 1, 2, id="tp2-zero2"),
    pytest.param(2, 1, 2, 1, id="pp2-zero1"),
]


def _layout_args(tp, pp, zero):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--zero-stage", str(zero)]


@pytest.mark.parametrize("nproc, tp, pp, zero", LAYOUTS)
def test_exact_resume(tiny_data, tmp_path, nproc, tp, pp, zero):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = base_args(tiny_data) + _layout_args(tp, pp, zero) + ["--train-iters", str(2 * N)]
    check(launch(nproc, common + ["--save", str(straight), "--save-interval", str(N)], tmp_path))
    check(launch(nproc, common + ["--save", str(resumed), "--load", str(straight / f"step_{N:08d}")], tmp_path))
    full, tail = metrics(straight), metrics(resumed)
    assert [m["step"] for m in full] == list(range(1, 2 * N + 1))
    assert [m["step"] for m in tail] == list(range(N + 1, 2 * N + 1))
    for a, b in zip(full[N:], tail):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}
    state = json.loads((resumed / f"step_{2 * N:08d}" / "trainer_state.json").read_text())
    assert state["consumed_samples"] == 2 * N * 4
    assert state["layout"] == {"tensor": tp, "pipeline": pp, "data": nproc // (tp * pp), "zero_stage": zero}


def test_load_into_another_layout(tiny_data, tmp_path):
    """A tp=2 checkpoint resumes on one rank: its weights are gathered to full tensors at save time and
    loaded before sharding, so the first resumed loss matches the tp=2 run's (up to reduction order)."""
    src, dst = tmp_path / "tp2", tmp_path / "one"
    common = base_args(tiny_data) + ["--train-iters", "2"]
    check(launch(2, common + _layout_args(2, 1, 1) + ["--save", str(src), "--save-interval", "1"], tmp_path))
    proc = launch(1, common + _layout_args(1, 1, 1) + ["--save", str(dst), "--load", str(src / "step_00000001")],
                  tmp_path)
    check(proc)
    assert "resharding" in proc.stdout
    (a,), (b,) = metrics(src)[1:], metrics(dst)
    assert a["step"] == b["step"] == 2
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["loss_head_2"] == pytest.approx(a["loss_head_2"], rel=1e-5)
