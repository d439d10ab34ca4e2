"""A resume into another layout carries the optimizer state (``optim/``): the losses of the steps after
a resharded resume equal the run's own continuation to 1e-6 relative (fp32 on the CPU), and they do
not without the Adam moments.

The reference is the saving run's own steps after the checkpoint: a same-layout resume reproduces
them bit for bit (tests/training/test_resume.py)."""

import json
import shutil

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

from megafim.checkpoint import manifest
from megafim.checkpoint.sharded import ShardedState
from tests.training.launcher import base_args, check, launch, metrics

N, TAIL = 2, 5
KEYS = ("loss", "loss_head_1", "loss_head_2")


def _args(tp, pp, zero):
    # micro-batches of 1 on both sides so that a pipeline change keeps the same micro-batches
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--zero-stage", str(zero), "--micro-batch-size", "1"]


def _saved_run(tiny_data, tmp_path, nproc, tp, pp, zero, extra=()):
    """N + TAIL steps, saving at N; returns (its checkpoint at N, its metrics)."""
    src = tmp_path / "src"
    args = base_args(tiny_data) + _args(tp, pp, zero) + list(extra) + [
        "--train-iters", str(N + TAIL), "--save", str(src), "--save-interval", str(N)]
    check(launch(nproc, args, tmp_path))
    return src / f"step_{N:08d}", metrics(src)


def _resume(tiny_data, tmp_path, ckpt, name, nproc, tp, pp, zero, extra=()):
    dst = tmp_path / name
    args = base_args(tiny_data) + _args(tp, pp, zero) + list(extra) + [
        "--train-iters", str(N + TAIL), "--save", str(dst), "--load", str(ckpt)]
    proc = launch(nproc, args, tmp_path)
    check(proc)
    assert "resharding" in proc.stdout
    return proc, metrics(dst)


def _max_rel_diff(expected, got):
    assert [m["step"] for m in got] == [m["step"] for m in expected] == list(range(N + 1, N + TAIL + 1))
    return max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(expected, got) for k in KEYS)


@pytest.mark.parametrize("src, dst", [
    pytest.param((2, 2, 1, 1), (2, 1, 1, 1), id="tp2-to-tp1-dp2"),
    pytest.param((2, 1, 2, 1), (1, 1, 1, 0), id="pp2-to-pp1-zero0"),
    pytest.param((2, 1, 1, 1), (2, 1, 1, 2), id="zero1-to-zero2"),
    pytest.param((2, 1, 1, 3), (2, 2, 1, 3), id="zero3-dp2-to-tp2"),  # ZeRO-3 gathers and scatters itself
])
def test_resharded_resume_carries_the_optimizer_state(tiny_data, tmp_path, src, dst):
    ckpt, straight = _saved_run(tiny_data, tmp_path, *src)
    index = json.loads((ckpt / "optim" / "index.json").read_text())
    assert index["metadata"] == {"step": N}
    assert "layers.0.self_attn.q_proj.weight.exp_avg_sq" in index["tensors"]
    _, resumed = _resume(tiny_data, tmp_path, ckpt, "dst", *dst)
    diff = _max_rel_diff(straight[N:], resumed)
    print(f"{src} -> {dst}: largest relative loss difference {diff:.2e}")
    assert diff <= 1e-6
    if src[1] == 2:  # without the moments the same resume trains differently: the check above can fail
        bare = _copy_without(ckpt, tmp_path / "bare", lambda name: True)
        proc, fresh = _resume(tiny_data, tmp_path, bare, "fresh", *dst)
        assert "holds no optimizer state (optim/): the optimizer starts fresh" in proc.stdout
        fresh_diff = _max_rel_diff(straight[N:], fresh)
        print(f"without the moments: {fresh_diff:.2e}")
        assert fresh_diff > 1e-4
        _refused_when_it_does_not_fit(tiny_data, tmp_path, ckpt)


def _copy_without(ckpt, root, drop):
    """A copy of ``ckpt`` whose optim/ lacks the tensors ``drop(name)`` selects (all: no optim/)."""
    copy = root / ckpt.name
    shutil.copytree(ckpt, copy)
    index = copy / "optim" / "index.json"
    data = json.loads(index.read_text())
    data["tensors"] = {k: v for k, v in data["tensors"].items() if not drop(k)}
    if data["tensors"]:
        index.write_text(json.dumps(data))
    else:
        shutil.rmtree(copy / "optim")
    manifest.write(copy)
    return copy


def _master_difference(a, b):
    """The mean difference of the fp32 master weights of two checkpoints relative to their mean
    magnitude, over every tensor."""
    a, b = ShardedState(a / "optim"), ShardedState(b / "optim")
    names = [k for k in a if k.endswith(".fp32")]
    return sum(float((a[k] - b[k]).abs().sum()) for k in names) / sum(float(a[k].abs().sum()) for k in names)


def test_bf16_resharded_resume_carries_the_fp32_master_weights(tiny_data, tmp_path):
    """In bf16 the weights in model/ are rounded; the fp32 masters in optim/ carry what the rounding
    lost. On one rank (with dp > 1 ZeRO-1 and ZeRO-2 reduce the bf16 gradients in another order) the
    masters two steps after a ZeRO-1 -> ZeRO-2 resume equal the saving run's (measured: exactly), and
    without them they are off by about bf16's rounding (1.3e-3)."""
    bf16 = ["--set", "schedule.precision=bf16", "--save-interval", str(N)]
    ckpt, straight = _saved_run(tiny_data, tmp_path, 1, 1, 1, 1, bf16)
    index = json.loads((ckpt / "optim" / "index.json").read_text())
    assert index["tensors"]["layers.0.mlp.up_proj.weight.fp32"]["dtype"] == "F32"
    _, resumed = _resume(tiny_data, tmp_path, ckpt, "dst", 1, 1, 1, 2, bf16)
    bare = _copy_without(ckpt, tmp_path / "bare", lambda name: name.endswith(".fp32"))
    _, rounded = _resume(tiny_data, tmp_path, bare, "rounded", 1, 1, 1, 2, bf16)
    later = f"step_{2 * N:08d}"
    with_masters = _master_difference(tmp_path / "src" / later, tmp_path / "dst" / later)
    without = _master_difference(tmp_path / "src" / later, tmp_path / "rounded" / later)
    losses_with, losses_without = _max_rel_diff(straight[N:], resumed), _max_rel_diff(straight[N:], rounded)
    print(f"bf16 ZeRO-1 -> ZeRO-2, fp32 masters at step {2 * N}: {with_masters:.2e} with, "
          f"{without:.2e} without; losses: {losses_with:.2e} with, {losses_without:.2e} without")
    assert with_masters <= 1e-6 and losses_with <= 1e-6
    assert without > 1e-4 and losses_without > 1e-5


def _refused_when_it_does_not_fit(tiny_data, tmp_path, ckpt):
    broken = tmp_path / "broken" / ckpt.name
    shutil.copytree(ckpt, broken)
    index = broken / "optim" / "index.json"
    data = json.loads(index.read_text())
    del data["tensors"]["norm.weight.exp_avg"]
    index.write_text(json.dumps(data))
    manifest.write(broken)
    args = base_args(tiny_data) + _args(1, 1, 0) + ["--train-iters", str(N + 1), "--load", str(broken)]
    proc = launch(1, args, tmp_path)
    check(proc, code=2)
    assert proc.stderr.count("\n") == 1 and f"{index}: no norm.weight.exp_avg" in proc.stderr, proc.stderr
