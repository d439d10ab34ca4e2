"""The 1F1B schedule: its order, and a pp=2 DeepSpeed run matching a one-process reference per ZeRO stage.

ZeRO-3 is not run here: it checks that every rank of the world traced the same modules, which
pipeline stages never do (the trainer refuses ZeRO-3 with pp > 1, docs/training.md)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megafim.training.pipeline import StageComm, one_f_one_b_order, run_1f1b


@pytest.mark.parametrize("n_stages, n_micro", [(1, 3), (2, 1), (2, 4), (4, 3), (4, 8)])
def test_order_is_1f1b(n_stages, n_micro):
    for stage in range(n_stages):
        order = one_f_one_b_order(stage, n_stages, n_micro)
        assert [i for k, i in order if k == "F"] == list(range(n_micro))
        assert [i for k, i in order if k == "B"] == list(range(n_micro))
        alive, peak = set(), 0
        for kind, i in order:
            if kind == "F":
                alive.add(i)
            else:
                assert i in alive  # a backward always follows its own forward
                alive.remove(i)
            peak = max(peak, len(alive))
        assert peak <= n_stages - stage  # the 1F1B memory bound
        if stage == n_stages - 1:  # the last stage alternates strictly
            assert order[:2] == [("F", 0), ("B", 0)]


D, N_MICRO, MB, STEPS = 8, 3, 2, 2


def _layers():
    torch.manual_seed(0)
    return torch.nn.ModuleList(torch.nn.Linear(D, D) for _ in range(4))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(MB, D, generator=g), torch.randn(MB, D, generator=g)) for _ in range(N_MICRO * STEPS)]


def _reference():
    layers = _layers()
    opt = torch.optim.AdamW(layers.parameters(), lr=0.01)
    data = _data()
    for step in range(STEPS):
        for i in range(N_MICRO):
            x, y = data[step * N_MICRO + i]
            for layer in layers:
                x = torch.tanh(layer(x))
            (torch.nn.functional.mse_loss(x, y) / N_MICRO).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in layers.parameters()]


class _PipelineOnlyMpu:
    """Two ranks, two stages, data-parallel size 1: what megafim.parallel's adapter reports for pp=2."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.dp = dist.new_group([0]), dist.new_group([1])
        self.mp = dist.new_group([0, 1])

    def get_data_parallel_group(self):
        return self.dp[self.rank]

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return 1

    def get_model_parallel_group(self):
        return self.mp

    def get_model_parallel_rank(self):
        return self.rank

    def get_model_parallel_world_size(self):
        return 2


def _worker(rank, port, tmp, zero_stages, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TMPDIR=tmp, DS_ACCELERATOR="cpu")
    import deepspeed

    from megafim.training.distributed import WorldInfo, init_distributed, shutdown

    init_distributed(WorldInfo(rank, 2, rank), "gloo")
    mpu = _PipelineOnlyMpu()
    results = {}
    for zero in zero_stages:
        layers = _layers()
        mine = list(layers)[:2] if rank == 0 else list(layers)[2:]
        stage = torch.nn.Sequential(mine[0], torch.nn.Tanh(), mine[1], torch.nn.Tanh())
        engine, *_ = deepspeed.initialize(
            model=stage, optimizer=torch.optim.AdamW(stage.parameters(), lr=0.01), mpu=mpu,
            config={"train_batch_size": MB * N_MICRO, "train_micro_batch_size_per_gpu": MB,
                    "gradient_accumulation_steps": N_MICRO, "zero_optimization": {"stage": zero},
                    "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
        comm = StageComm(rank, 2, None if rank == 0 else 0, 1 if rank == 0 else None, (MB, D))
        data = _data()
        for step in range(STEPS):
            def forward(i, received):
                x, y = data[step * N_MICRO + i]
                out = engine(x if received is None else received)
                return torch.nn.functional.mse_loss(out, y) if rank == 1 else out

            def backward(output, grad):
                if grad is None:
                    engine.backward(output)
                else:
                    engine.backward((output * grad).sum(), scale_wrt_gas=False)

            run_1f1b(comm, N_MICRO, forward, backward, lambda i: engine.step())
        # Gather the full (ZeRO-3-partitioned) parameters of this stage for the comparison.
        with deepspeed.zero.GatheredParameters(list(stage.parameters()), enabled=zero == 3):
            results[zero] = [p.detach().numpy().copy() for p in stage.parameters()]  # pickled by value
    queue.put((rank, results))
    shutdown()


def test_pp2_matches_reference_under_every_zero_stage(tmp_path):
    from megafim.training.distributed import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), (0, 1, 2), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = _reference()
    for zero in (0, 1, 2):
        params = got[0][zero] + got[1][zero]
        for a, b in zip(params, expected):
            torch.testing.assert_close(torch.from_numpy(a), b, rtol=0, atol=1e-6, msg=f"ZeRO-{zero}")
