"""ModelConfig validation and the registry of named sizes."""

import pytest

from megafim.model import GPT, MODEL_SIZES, ModelConfigError, model_config


def test_registry_holds_the_issue_shapes():
    big = model_config("1.3B")
    assert (big.hidden_size, big.n_layers, big.n_heads, big.ffn_hidden_size) == (2048, 24, 16, 5632)
    llama7b = model_config("7B")
    assert llama7b.num_parameters() == 6_738_415_616  # Llama-2-7B's published count
    assert 100_000 < model_config("tiny").num_parameters() < 1_000_000
    assert set(MODEL_SIZES) == {"tiny", "125M", "350M", "1.3B", "7B"}


@pytest.mark.parametrize("n_future", [1, 3])
def test_num_parameters_counts_the_built_model(n_future):
    config = model_config("tiny", n_future=n_future)
    model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    # n_layers counts trunk + first head; each further head adds one block
    assert len(model.layers) == config.n_layers - 1 and len(model.heads) == n_future


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=64, n_heads=6), "n_heads"),
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
        (dict(hidden_size=24, n_heads=8, n_kv_heads=4), "head dimension"),
        (dict(n_future=0), "n_future"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(n_layers=True), "n_layers"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(activation_checkpointing="yes"), "activation_checkpointing"),
        (dict(n_experts=4), "n_experts"),
    ],
)
def test_invalid_fields_name_themselves(overrides, field):
    with pytest.raises(ModelConfigError, match=field):
        model_config("tiny", **overrides)


def test_unknown_size_lists_known_ones():
    with pytest.raises(ModelConfigError, match="tiny"):
        model_config("13B")
