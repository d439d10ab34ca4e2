"""The layout-free optimizer state (megafim/checkpoint/optim_state.py) in one process, with the torch
optimizer DeepSpeed uses as is without ZeRO: what two pipeline stages write reads back in another
pipeline layout as the global moments it was cut from; a checkpoint whose optimizer state does not
fit is refused naming the file. (Tensor-parallel slices need process groups, and ZeRO 1/2/3 need
DeepSpeed: tests/training/test_reshard_optimizer.py.)"""

import json
import zlib

import pytest
import torch

from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.optim_state import MOMENTS, adam_step, load_optimizer_state, save_optimizer_state, \
    tp_region
from megafim.checkpoint.sharded import merge_index
from megafim.model import model_config
from megafim.parallel import ParallelDims
from megafim.training.build import build_stage, plan_stages
from megafim.training.config import OptimizerSection
from megafim.training.optim import build_optimizer

MC = model_config("tiny", n_layers=3, n_future=2)


def _reference(name: str, key: str, shape) -> torch.Tensor:
    """A global moment that differs in every element, every parameter and every key."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{key}".encode()))
    return torch.rand(shape, generator=g) + 0.1


def _rank(tp=1, pp=1, rank=0, mc=MC):
    dims = ParallelDims(tp=tp, pp=pp, dp=1, rank=rank)
    stage = build_stage(mc, plan_stages(mc.n_trunk_layers, mc.n_future, pp)[dims.pp_rank], 0, dims)
    return stage, build_optimizer(stage, OptimizerSection()), dims


def _trained(steps, **layout):
    """A rank whose optimizer has taken ``steps`` steps and holds its slices of the reference moments."""
    stage, opt, dims = _rank(**layout)
    for _ in range(steps):
        for p in stage.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    for name, p in stage.full_state_names().items():
        offset, shape = tp_region(p, dims)
        region = tuple(slice(o, o + n) for o, n in zip(offset, p.shape))
        for key in MOMENTS:
            opt.state[p][key].copy_(_reference(name, key, shape)[region])
    return stage, opt, dims


def _load(folder, stage, opt, dims):
    return load_optimizer_state(folder, opt, stage, dims)


def _save(folder, ranks):
    for stage, opt, dims in ranks:
        assert save_optimizer_state(folder, f"tp{dims.tp_rank:02d}_pp{dims.pp_rank:02d}", opt, stage, dims)
    merge_index(folder, {"step": adam_step(ranks[0][1])})


@pytest.mark.parametrize("src, dst", [({"pp": 2}, {"pp": 1}), ({"pp": 1}, {"pp": 2})],
                         ids=["pp2-to-pp1", "pp1-to-pp2"])
def test_moments_and_step_read_back_in_another_layout(tmp_path, src, dst):
    n_src, n_dst = max(src.values()), max(dst.values())
    _save(tmp_path, [_trained(3, rank=r, **src) for r in range(n_src)])
    for rank in range(n_dst):
        stage, opt, dims = _rank(rank=rank, **dst)
        assert load_optimizer_state(tmp_path, opt, stage, dims) == 3
        assert adam_step(opt) == 3
        for name, p in stage.full_state_names().items():
            offset, shape = tp_region(p, dims)
            region = tuple(slice(o, o + n) for o, n in zip(offset, p.shape))
            for key in MOMENTS:
                assert torch.equal(opt.state[p][key], _reference(name, key, shape)[region]), (name, key)


def test_nothing_is_written_before_the_first_step_and_nothing_is_set_without_optim(tmp_path):
    stage, opt, dims = _rank()
    assert not save_optimizer_state(tmp_path / "optim", "tp00_pp00", opt, stage, dims)
    assert not (tmp_path / "optim").exists()
    assert load_optimizer_state(tmp_path / "optim", opt, stage, dims) is None and not opt.state


def test_optimizer_state_that_does_not_fit_is_refused(tmp_path):
    _save(tmp_path, [_trained(1)])
    index = tmp_path / "index.json"
    stage, opt, dims = _rank(mc=model_config("tiny", n_layers=3, n_future=2, hidden_size=32))
    expected = r"index.json: embed_tokens.weight.exp_avg has shape \[512, 64\], this model's is \[512, 32\]"
    with pytest.raises(CheckpointError, match=expected):
        load_optimizer_state(tmp_path, opt, stage, dims)
    data = json.loads(index.read_text())
    del data["tensors"]["norm.weight.exp_avg_sq"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"index.json: no norm.weight.exp_avg_sq"):
        _load(tmp_path, *_rank())
    data["metadata"] = {}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"index.json: metadata.step is None"):
        _load(tmp_path, *_rank())


def test_host_copies_write_the_state_of_the_save_after_the_optimizer_moved_on(tmp_path):
    """``copy_to_host`` (an asynchronous save): the gathers run at the call and the returned writes,
    run later, write what a synchronous save at that moment wrote, though the optimizer stepped since
    (without ZeRO its state tensors are the live ones: the copies must be private)."""
    stage, opt, dims = _trained(2)
    assert save_optimizer_state(tmp_path / "sync", "tp00_pp00", opt, stage, dims)() is None
    write = save_optimizer_state(tmp_path / "async", "tp00_pp00", opt, stage, dims, copy_to_host=True)
    assert not (tmp_path / "async").exists()
    for p in stage.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    write()
    for name in ("tp00_pp00.safetensors", "tp00_pp00.json"):
        assert (tmp_path / "async" / name).read_bytes() == (tmp_path / "sync" / name).read_bytes()
