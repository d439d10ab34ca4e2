"""Pure pieces of the trainer: how layers are cut into pipeline stages, and which samples each
data-parallel rank reads (a function of the consumed-sample count only, so a resume continues it)."""

import itertools

import pytest
import torch

from megafim.model import model_config
from megafim.training.build import PipelineStage, build_stage, plan_stages
from megafim.training.sampler import ResumableSampler


@pytest.mark.parametrize("n_trunk, n_future, pp", [(3, 1, 1), (3, 4, 2), (7, 1, 4), (23, 4, 2), (31, 4, 4),
                                                   (1, 2, 2), (5, 1, 6)])
def test_plan_stages_cover_the_trunk_in_order(n_trunk, n_future, pp):
    plans = plan_stages(n_trunk, n_future, pp)
    assert [p.stage for p in plans] == list(range(pp))
    assert [i for p in plans for i in p.layers] == list(range(n_trunk))
    assert all(p.layers for p in plans[:-1])  # only the last stage (which has the heads) may have none
    blocks = [len(p.layers) for p in plans[:-1]] + [len(plans[-1].layers) + n_future]
    assert max(blocks) - min(blocks) <= max(1, n_future)  # roughly balanced


def test_stage_keeps_whole_model_names():
    mc = model_config("tiny", n_layers=5, n_future=2)
    first, last = plan_stages(mc.n_trunk_layers, mc.n_future, 2)
    torch.manual_seed(0)
    from megafim.model import GPT

    s0, s1 = PipelineStage(GPT(mc), first), PipelineStage(GPT(mc), last)
    names0, names1 = set(s0.full_state_names()), set(s1.full_state_names())
    full = set(dict(GPT(mc).named_parameters()))
    assert names0 | names1 == full and not names0 & names1
    assert "embed_tokens.weight" in names0 and "lm_head.weight" in names1 and "heads.1.mlp.up_proj.weight" in names1


def test_build_stage_holds_the_seeded_models_weights():
    # Built on the meta device and made one weight at a time, each stage holds exactly what the whole
    # model built from the same seed holds under those names; another seed gives other weights.
    from megafim.model import GPT

    mc = model_config("tiny", n_layers=5, n_future=2)
    torch.manual_seed(3)
    whole = dict(GPT(mc).named_parameters())
    for plan in plan_stages(mc.n_trunk_layers, mc.n_future, 2):
        stage = build_stage(mc, plan, 3)
        for name, param in stage.model.named_parameters():
            assert param.device.type == "cpu" and torch.equal(param, whole[name]), name
    whole_plan = plan_stages(mc.n_trunk_layers, mc.n_future, 1)[0]
    other = dict(build_stage(mc, whole_plan, 4).model.named_parameters())
    assert not torch.equal(other["lm_head.weight"], whole["lm_head.weight"])
    assert torch.equal(other["norm.weight"], torch.ones_like(other["norm.weight"]))
    std = other["layers.0.mlp.down_proj.weight"].std().item()  # residual projections scaled by depth
    assert abs(std - mc.init_std / (2 * mc.n_layers) ** 0.5) < 0.2 * std


def test_sampler_ranks_are_disjoint_and_resume_exactly():
    n, mb, dp = 50, 3, 2
    def take(rank, consumed, k):
        return list(itertools.islice(iter(ResumableSampler(n, mb, rank, dp, consumed)), k))

    straight = [take(r, 0, 10) for r in range(dp)]
    for step in range(10):  # each global micro-batch: all ranks together read consecutive, distinct samples
        got = sorted(straight[0][step] + straight[1][step])
        assert got == sorted((step * mb * dp + i) % n for i in range(mb * dp))
    for r in range(dp):  # resuming at 4 global micro-batches continues the same stream
        assert take(r, 4 * mb * dp, 6) == straight[r][4:]
    assert ResumableSampler(n, mb, 0, dp).epoch(120) == 2
    with pytest.raises(ValueError, match="dp_rank"):
        ResumableSampler(n, mb, 2, dp)


def test_build_stage_reads_checkpoint_weights_checking_names_and_shapes(tmp_path):
    # A run resuming from a checkpoint of another layout builds its stage from the layout-free
    # tensors, one at a time; a name or a shape the model does not match is named in the error.
    import dataclasses
    import json

    from safetensors.torch import save_file

    from megafim.model import GPT
    from megafim.checkpoint.format import MODEL_DIR
    from megafim.checkpoint.weights import full_weights

    mc = model_config("tiny", n_layers=3)
    torch.manual_seed(5)
    state = {k: v.detach().clone() for k, v in GPT(mc).state_dict().items()}
    folder = tmp_path / MODEL_DIR
    folder.mkdir()
    (folder / "model_config.json").write_text(json.dumps(dataclasses.asdict(mc)))
    save_file(state, folder / "stage_0.safetensors")
    plan = plan_stages(mc.n_trunk_layers, mc.n_future, 1)[0]
    stage = build_stage(mc, plan, 99, weights=full_weights(tmp_path))
    for name, param in stage.model.named_parameters():
        assert torch.equal(param, state[name]), name
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \(512, 64\) in the checkpoint"):
        build_stage(mc.replace(vocab_size=1024), plan, 99, weights=full_weights(tmp_path))
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, folder / "stage_0.safetensors")
    with pytest.raises(KeyError, match="no weights for lm_head.weight"):
        build_stage(mc, plan, 99, weights=full_weights(tmp_path))
