"""Exact resume: 2N steps straight == N steps, save, resume, N steps (fp32 on the CPU, bit-identical
losses, per-head losses and gradient norms), for the layouts and ZeRO stages the trainer supports;
and a checkpoint of one layout loaded into another (resharded weights)."""

import json

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

from tests.training.launcher import base_args, check, launch, metrics

N = 2
GLOBAL_BATCH = 4  # base_args
KEYS = ("loss", "loss_head_1", "loss_head_2", "grad_norm", "lr", "consumed_samples")

# (ranks, tensor, pipeline, ZeRO stage): the ZeRO stages are spread over the layouts to keep the
# launches few; one rank with ZeRO-0 is test_trainer_runs.py::test_loss_falls_and_exact_resume, and
# ZeRO-3 with pp > 1 is refused (test_trainer_runs.py::test_zero3_with_pipeline_is_refused).
LAYOUTS = [
    pytest.param(2, 1, 1, 3, id="dp2-zero3"),
    pytest.param(2, 2, 1, 2, id="tp2-zero2"),
    pytest.param(4, 1, 2, 2, id="pp2-dp2-zero2"),  # ZeRO-1 is the same DeepSpeed code as ZeRO-2
]


def _layout_args(tp, pp, zero):
    args = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--zero-stage", str(zero)]
    # With pipelines, micro-batches of 1 so that 1F1B interleaves several of them per step.
    return args + (["--micro-batch-size", "1"] if pp > 1 else [])


def check_exact_resume(tiny_data, tmp_path, nproc, tp, pp, zero):
    """Run 2N steps saving at N, resume from N to 2N; returns the straight run's directory."""
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
    assert state["consumed_samples"] == 2 * N * GLOBAL_BATCH
    assert state["layout"] == {"tensor": tp, "pipeline": pp, "data": nproc // (tp * pp), "zero_stage": zero}
    return straight


@pytest.mark.parametrize("nproc, tp, pp, zero", LAYOUTS)
def test_exact_resume(tiny_data, tmp_path, nproc, tp, pp, zero):
    straight = check_exact_resume(tiny_data, tmp_path, nproc, tp, pp, zero)
    if tp == 2:
        _load_into_one_rank(tiny_data, tmp_path, straight)


def _load_into_one_rank(tiny_data, tmp_path, src):
    """The tp=2 checkpoint resumes on one rank: its weights were gathered to full tensors at save time
    and load before sharding, so the first resumed loss matches the tp=2 run's (up to reduction order)."""
    dst = tmp_path / "one"
    args = base_args(tiny_data) + _layout_args(1, 1, 1) + ["--train-iters", str(N + 1), "--save", str(dst),
                                                           "--load", str(src / f"step_{N:08d}")]
    proc = launch(1, args, tmp_path)
    check(proc)
    assert "resharding" in proc.stdout
    a, (b,) = metrics(src)[N], metrics(dst)
    assert a["step"] == b["step"] == N + 1
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["loss_head_2"] == pytest.approx(a["loss_head_2"], rel=1e-5)
