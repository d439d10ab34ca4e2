"""Config: defaults < YAML file < --set / Megatron flags; validation errors name the field."""

import math
from pathlib import Path

import pytest

from megafim.training.cli import config_from_args, dump_yaml
from megafim.model import ModelConfig
from megafim.training.config import (ConfigError, TrainConfig, build_data_config, grad_accumulation_steps,
                                     lr_at, model_overrides, resolve_model_config, validate)
from megafim.training.deepspeed_config import effective_deepspeed_config


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_defaults_file_then_overrides(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: 0.001\nbatch:\n  micro_batch_size: 4\n  global_batch_size: 16\n")
    cfg, _ = config_from_args(["--config", str(path), "--set", "optimizer.lr=0.002", "--seed", "7"])
    assert cfg.optimizer.lr == 0.002          # --set beats the file
    assert cfg.batch.micro_batch_size == 4    # the file beats the default
    assert cfg.schedule.seed == 7             # Megatron flag
    assert cfg.optimizer.beta2 == TrainConfig().optimizer.beta2  # untouched default


def test_megatron_flags_map_to_fields():
    cfg, _ = config_from_args([
        "--data-path", "0.7", "a", "0.3", "b", "--tokenizer-model", "t.model", "--seq-length", "32",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "9", "--lr", "1e-3",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--zero-stage", "2",
        "--n-future", "4", "--fim-rate", "0.9", "--fim-spm-rate", "0.25", "--save", "s", "--load", "l",
        "--save-interval", "3"])
    assert cfg.data.data_path == ["0.7", "a", "0.3", "b"]
    assert (cfg.data.tokenizer_model, cfg.data.seq_length) == ("t.model", 32)
    assert (cfg.batch.micro_batch_size, cfg.batch.global_batch_size, cfg.schedule.train_iters) == (1, 4, 9)
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage) == (2, 2, 2)
    assert (cfg.model.n_future, cfg.data.fim.rate, cfg.data.fim.spm_rate) == (4, 0.9, 0.25)
    assert (cfg.checkpoint.save, cfg.checkpoint.load, cfg.checkpoint.save_interval) == ("s", "l", 3)
    assert cfg.optimizer.lr == 1e-3


def test_set_parses_yaml_values_and_model_overrides():
    cfg, _ = config_from_args(["--set", "model.n_layers=3", "--set", "data.data_path=[x, y]",
                               "--set", "logging.tensorboard=false", "--set", "model.overrides.n_heads=4"])
    assert model_overrides(cfg.model) == {"n_layers": 3, "n_heads": 4}  # the older spelling still works
    assert cfg.data.data_path == ["x", "y"]
    assert cfg.logging.tensorboard is False


@pytest.mark.parametrize("argv, field", [
    (["--set", "optimizer.lrr=1"], "optimizer.lrr"),
    (["--set", "nosuch.lr=1"], "nosuch"),
    (["--set", "optimizer.lr=abc"], "optimizer.lr"),
    (["--set", "batch.micro_batch_size=1.5"], "batch.micro_batch_size"),
])
def test_bad_overrides_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_args(argv)


def test_file_errors_name_file_and_line(tmp_path):
    bad = _write(tmp_path, "optimizer:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line \d+"):
        config_from_args(["--config", str(bad)])
    unknown = _write(tmp_path, "optimizer:\n  learning_rate: 1\n", "u.yaml")
    with pytest.raises(ConfigError, match=r"u\.yaml.*optimizer\.learning_rate"):
        config_from_args(["--config", str(unknown)])


def test_validation_before_any_process_group():
    cfg = TrainConfig()
    cfg.batch.micro_batch_size, cfg.batch.global_batch_size = 2, 8
    assert grad_accumulation_steps(cfg, world_size=2) == 2
    with pytest.raises(ConfigError, match="batch.global_batch_size"):
        validate(cfg, world_size=3)
    cfg.parallel.tensor = 2
    with pytest.raises(ConfigError, match=r"parallel: world size 3 is not divisible by tensor \(2\)"):
        validate(cfg, world_size=3)
    cfg = TrainConfig()
    cfg.optimizer.min_lr = 1.0
    with pytest.raises(ConfigError, match="optimizer.min_lr"):
        validate(cfg, world_size=1)
    cfg = TrainConfig()
    cfg.parallel.zero_stage = 4
    with pytest.raises(ConfigError, match="parallel.zero_stage"):
        validate(cfg, world_size=1)


def test_validation_flags_and_checks():
    cfg, _ = config_from_args(["--eval-interval", "50", "--eval-iters", "4"])
    assert (cfg.schedule.eval_interval, cfg.schedule.eval_iters) == (50, 4)
    validate(cfg, world_size=1)
    cfg.data.split = "100,0,0"
    with pytest.raises(ConfigError, match=r"schedule.eval_interval = 50 needs validation documents.*data.split"):
        validate(cfg, world_size=1)
    cfg.data.split, cfg.schedule.eval_iters = "98,2,0", 0
    with pytest.raises(ConfigError, match="schedule.eval_iters"):
        validate(cfg, world_size=1)


def test_profiling_flags_and_checks():
    cfg, _ = config_from_args(["--profile-step-start", "3", "--profile-step-end", "4", "--profile-ranks", "0", "2",
                               "--save", "s"])
    lg = cfg.logging
    assert (lg.profile_step_start, lg.profile_step_end, lg.profile_ranks) == (3, 4, [0, 2])
    validate(cfg, world_size=1)
    lg.profile_step_end = 2
    with pytest.raises(ConfigError, match="logging.profile_step_end 2 is before"):
        validate(cfg, world_size=1)
    lg.profile_step_end, cfg.checkpoint.save = 0, ""
    with pytest.raises(ConfigError, match="logging.profile_dir nor checkpoint.save"):
        validate(cfg, world_size=1)
    lg.profile_dir, lg.profile_ranks = "p", [-1]
    with pytest.raises(ConfigError, match="logging.profile_ranks"):
        validate(cfg, world_size=1)


def test_model_shape_checks_name_the_field():
    shape = ModelConfig(hidden_size=72, n_heads=6, n_kv_heads=6, ffn_hidden_size=64, vocab_size=128, n_layers=3)
    cfg = TrainConfig()
    cfg.parallel.tensor = 4
    with pytest.raises(ConfigError, match=r"model.n_heads = 6 is not divisible by the tensor-parallel size 4 \(parallel.tensor\)"):
        validate(cfg, world_size=4, model_config=shape)
    cfg.parallel.tensor, cfg.parallel.pipeline = 1, 4
    cfg.batch.global_batch_size = 2
    with pytest.raises(ConfigError, match="parallel.pipeline = 4"):
        validate(cfg, world_size=4, model_config=shape)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig()
    cfg.optimizer.lr, cfg.optimizer.min_lr = 1.0, 0.1
    cfg.schedule.warmup_iters, cfg.schedule.train_iters = 4, 14
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lr_at(cfg, 9), 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_at(cfg, 14), 0.1) and math.isclose(lr_at(cfg, 100), 0.1)
    values = [lr_at(cfg, s) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_effective_config_round_trips_through_yaml(tmp_path):
    cfg, _ = config_from_args(["--lr", "0.01", "--set", "model.n_layers=3", "--set", "data.fim.level=document"])
    path = _write(tmp_path, dump_yaml(cfg), "saved.yaml")
    again, _ = config_from_args(["--config", str(path)])
    assert again == cfg


def test_deepspeed_config_generated_and_merged(tmp_path):
    cfg = TrainConfig()
    cfg.batch.micro_batch_size, cfg.batch.global_batch_size = 1, 8
    cfg.parallel.zero_stage = 2
    ds = effective_deepspeed_config(cfg, world_size=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False  # fp32 on the CPU
    user = _write(tmp_path, '{"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5}',
                  "ds.json")
    cfg.deepspeed_config = str(user)
    ds = effective_deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 2, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 0.5
    clash = _write(tmp_path, '{"train_batch_size": 3}', "clash.json")
    cfg.deepspeed_config = str(clash)
    with pytest.raises(ConfigError, match="train_batch_size"):
        effective_deepspeed_config(cfg, world_size=2)


@pytest.mark.parametrize("name, world_size", [("tiny", 1), ("125M", 8), ("1.3B", 8), ("1.3B-16k-cp", 8), ("7B", 32)])
def test_example_configs_validate(name, world_size):
    repo = Path(__file__).resolve().parents[2]
    cfg, _ = config_from_args(["--config", str(repo / f"examples/configs/{name}.yaml")])
    mc = resolve_model_config(cfg, tokenizer_vocab=32000)
    validate(cfg, world_size, mc)
    assert mc.n_future == cfg.model.n_future and mc.max_seq_len >= cfg.data.seq_length
    if name == "1.3B-16k-cp":  # the long-context example really splits each sample over ranks
        assert cfg.parallel.context == 4 and cfg.data.seq_length == 16384
        assert cfg.data.seq_length % (2 * cfg.parallel.context) == 0


# --- one definition of each setting: the domain configs validate, the trainer names the field ----------


def test_model_size_typo_is_one_config_error():
    cfg, _ = config_from_args(["--set", "model.size=tinyy"])
    with pytest.raises(ConfigError, match=r"model.size: unknown size 'tinyy'; known sizes: tiny"):
        validate(cfg, world_size=1)


def test_model_field_errors_name_the_setting():
    cfg, _ = config_from_args(["--set", "model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"^model.n_kv_heads = 3 must divide n_heads"):
        validate(cfg, world_size=1)


def test_sequence_length_against_max_seq_len():
    cfg, _ = config_from_args(["--seq-length", "512", "--set", "model.max_seq_len=128"])
    with pytest.raises(ConfigError, match="data.seq_length 512 exceeds model.max_seq_len 128"):
        validate(cfg, world_size=1)
    cfg.model.max_seq_len = None  # unset: the size's limit follows data.seq_length, and says so
    notes = []
    assert resolve_model_config(cfg, None, notes).max_seq_len == 512
    assert notes == ["model.max_seq_len raised from size tiny's 256 to data.seq_length 512"]
    validate(cfg, world_size=1)


@pytest.mark.parametrize("raw, expected", [("on", "on"), ("off", "off"), ("true", "on"), ("auto", "auto")])
def test_progress_bar_accepts_yaml_booleans(raw, expected):
    cfg, _ = config_from_args(["--set", f"logging.progress_bar={raw}"])
    assert cfg.logging.progress_bar == expected


def test_choices_are_checked_from_the_field_metadata():
    with pytest.raises(ConfigError, match="logging.progress_bar must be one of auto, on, off, got 'sometimes'"):
        config_from_args(["--set", "logging.progress_bar=sometimes"])
    with pytest.raises(ConfigError, match="parallel.zero_stage must be one of 0, 1, 2, 3, got 5"):
        config_from_args(["--zero-stage", "5"])


def test_fim_section_is_the_fim_config(tmp_path):
    cfg, _ = config_from_args(["--set", "data.fim.mask_sentinels=true", "--fim-rate", "0.9",
                               "--data-path", "a", "--seed", "5"])
    data = build_data_config(cfg)
    assert data.fim == cfg.data.fim and data.fim.mask_sentinels and data.fim.rate == 0.9 and data.seed == 5
    with pytest.raises(ConfigError, match=r"data.fim.rate must be a number in \[0, 1\], got 1.5"):
        config_from_args(["--fim-rate", "1.5"])
    with pytest.raises(ConfigError, match=r"data.fim.level must be one of"):
        config_from_args(["--set", "data.fim.level=token"])
    cfg, _ = config_from_args(["--fim-rate", "0", "--data-path", "a"])
    assert build_data_config(cfg).fim is None


def test_data_settings_are_data_config_settings():
    cfg, _ = config_from_args(["--data-path", "0.3", "a", "0.7", "b", "--set", "data.fingerprint=content",
                               "--set", "data.verify_cache=false", "--seq-length", "16"])
    data = build_data_config(cfg)
    assert (data.data_paths, data.weights, data.seq_length) == (("a", "b"), (0.3, 0.7), 16)
    assert (data.fingerprint, data.verify_cache) == ("content", False)
    cfg.data.split = "1,2,3,4"
    with pytest.raises(ConfigError, match="split '1,2,3,4'"):
        validate(cfg, world_size=1)
    cfg.data.split, cfg.data.data_path = "98,2,0", ["0.5", "a", "b"]
    with pytest.raises(ConfigError, match="data.data_path: data path"):
        validate(cfg, world_size=1)


def test_older_model_overrides_in_a_file_fold_into_the_model_section(tmp_path):
    path = _write(tmp_path, "model:\n  n_future: 2\n  overrides:\n    n_layers: 3\n")
    cfg, _ = config_from_args(["--config", str(path)])
    assert model_overrides(cfg.model) == {"n_future": 2, "n_layers": 3}
    clash = _write(tmp_path, "model:\n  n_layers: 4\n  overrides:\n    n_layers: 3\n", "clash.yaml")
    with pytest.raises(ConfigError, match="model.n_layers = 4 and model.overrides.n_layers = 3 disagree"):
        config_from_args(["--config", str(clash)])


def test_every_setting_is_documented_and_the_reference_page_is_current():
    from megafim.training.cli import config_reference
    from megafim.training.field_docs import reference_rows

    rows = reference_rows(TrainConfig)
    assert {name for name, *_ in rows} >= {"model.n_future", "data.fim.mask_sentinels", "data.verify_cache"}
    undocumented = [name for name, _, _, meaning in rows if not meaning.strip()]
    assert not undocumented, f"settings without a docstring: {undocumented}"
    repo = Path(__file__).resolve().parents[2]
    page = (repo / "docs/config_reference.md").read_text()
    assert page == config_reference(markdown=True), \
        "docs/config_reference.md is stale: python -m megafim.train --help-config --markdown > docs/config_reference.md"


def test_config_error_of_a_nonzero_rank_alone_is_still_printed(monkeypatch, capsys):
    # A rank that outlives the grace period failed on its own (rank 0 did not), so it must say why.
    from megafim.train import _report_config_error

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _report_config_error(ValueError("data.data_path: missing on this node"), grace_s=0.0)
    assert capsys.readouterr().err == "megafim.train: error: data.data_path: missing on this node\n"
