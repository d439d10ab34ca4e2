"""Config: defaults < YAML file < --set / Megatron flags; validation errors name the field."""

import math
from pathlib import Path

import pytest

from megafim.training.cli import config_from_args, dump_yaml
from megafim.training.config import ConfigError, TrainConfig, grad_accumulation_steps, lr_at, validate
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
    cfg, _ = config_from_args(["--set", "model.overrides.n_layers=3", "--set", "data.data_path=[x, y]",
                               "--set", "logging.tensorboard=false"])
    assert cfg.model.overrides == {"n_layers": 3}
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
    with pytest.raises(ConfigError, match="parallel.tensor x parallel.pipeline"):
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
    class Shape:  # a resolved model shape, as ModelConfig carries it
        n_heads, n_kv_heads, ffn_hidden_size, vocab_size, n_layers = 6, 6, 64, 128, 3

    cfg = TrainConfig()
    cfg.parallel.tensor = 4
    with pytest.raises(ConfigError, match="n_heads = 6 is not divisible by parallel.tensor = 4"):
        validate(cfg, world_size=4, model_config=Shape())
    cfg.parallel.tensor, cfg.parallel.pipeline = 1, 4
    cfg.batch.global_batch_size = 2
    with pytest.raises(ConfigError, match="parallel.pipeline = 4"):
        validate(cfg, world_size=4, model_config=Shape())


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
    cfg, _ = config_from_args(["--lr", "0.01", "--set", "model.overrides.n_layers=3"])
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


@pytest.mark.parametrize("name, world_size", [("tiny", 1), ("125M", 8), ("1.3B", 8), ("7B", 32)])
def test_example_configs_validate(name, world_size):
    from megafim.training.build import resolve_model_config

    repo = Path(__file__).resolve().parents[2]
    cfg, _ = config_from_args(["--config", str(repo / f"examples/configs/{name}.yaml")])
    mc = resolve_model_config(cfg, tokenizer_vocab=32000)
    validate(cfg, world_size, mc)
    assert mc.n_future == cfg.model.n_future and mc.max_seq_len >= cfg.data.seq_length
