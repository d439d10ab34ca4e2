"""One rank: three optimizer steps (finite, non-finite, finite) of a tiny model under DeepSpeed ZeRO
0-3 with the trainer's SkippableAdamW, with and without gradient clipping (with it, ZeRO 1/2 find the
non-finite gradients themselves and do not call the optimizer), against plain torch AdamW that simply
leaves the bad step out. Writes {"<stage>/clip=<c>": {"max_abs_diff": float, "steps": [Adam's step
count of each tensor it steps on]}}."""

import argparse
import json
import logging
import os

import torch

from megafim.training.optim import SkippableAdamW, param_groups

os.environ.setdefault("DS_BUILD_SHM_COMM", "0")


def model():
    torch.manual_seed(0)  # two parameter groups: the matrix (decay) and the norm's scale and bias
    return torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.LayerNorm(8))


def loss_of(net, i):
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(i))
    return (net(x) - 0.5).pow(2).mean()


def reference(clip):
    net = model()
    opt = torch.optim.AdamW(param_groups(net, 0.1), lr=1e-2)
    for i in (0, 2):  # step 1 (non-finite) is skipped
        opt.zero_grad()
        loss_of(net, i).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def under_zero(stage, clip):
    import deepspeed

    net = model()
    opt = SkippableAdamW(param_groups(net, 0.1), lr=1e-2)
    cfg = {"train_batch_size": 1, "gradient_clipping": clip, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    for i in range(3):
        loss = loss_of(engine, i) * (float("nan") if i == 1 else 1.0)
        if i == 1:  # the trainer's protocol (megafim/training/loop.py train_step)
            opt.skip_next_step()
        engine.backward(loss)
        engine.step()
        opt.end_step()
    with deepspeed.zero.GatheredParameters(list(net.parameters()), enabled=stage == 3):
        params = [p.detach().clone() for p in net.parameters()]
    return params, [float(s["step"]) for s in opt.state.values()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    results = {}
    for clip in (1.0, 0.0):
        expected = reference(clip)
        for stage in (0, 1, 2, 3):
            params, steps = under_zero(stage, clip)
            diff = max(float((a - b).abs().max()) for a, b in zip(params, expected))  # NaN: a NaN update
            results[f"{stage}/clip={clip}"] = {"max_abs_diff": diff, "steps": steps}
    with open(args.out, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
