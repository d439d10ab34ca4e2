"""Command line -> ``TrainConfig``: defaults, then ``--config FILE``, then overrides.

Overrides come in two spellings, applied in the order given:
- ``--set section.field=value`` for any field (the value is parsed as YAML: ``--set model.n_layers=4``);
- Megatron-style flags for the common settings (``--lr 3e-4``, ``--tensor-model-parallel-size 2``, ...).

``--help-config`` lists every setting with its type, default, flag and meaning, generated from the
config dataclasses (``docs/config_reference.md`` is the same list: ``--help-config --markdown``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from megafim.training.config import (ConfigError, TrainConfig, fold_model_overrides, from_dict, merge_dicts,
                                     to_dict)
from megafim.training.field_docs import reference_markdown, reference_text

# Megatron-LM flag -> (config path, type). The help text is the field's meaning.
MEGATRON_FLAGS: dict[str, tuple[str, type, str]] = {
    "--data-path": ("data.data_path", str, "dataset prefixes, optionally weighted: 0.7 A 0.3 B"),
    "--tokenizer-model": ("data.tokenizer_model", str, "sentencepiece .model, or HF tokenizer.json / directory"),
    "--tokenizer-type": ("data.tokenizer_type", str, "GPTSentencePieceTokenizer or HuggingFaceTokenizer"),
    "--seq-length": ("data.seq_length", int, "tokens per sample"),
    "--micro-batch-size": ("batch.micro_batch_size", int, "samples per rank per micro-step"),
    "--global-batch-size": ("batch.global_batch_size", int, "samples per optimizer step"),
    "--train-iters": ("schedule.train_iters", int, "optimizer steps"),
    "--lr": ("optimizer.lr", float, "peak learning rate"),
    "--min-lr": ("optimizer.min_lr", float, "final learning rate of the cosine decay"),
    "--lr-warmup-iters": ("schedule.warmup_iters", int, "linear warmup steps"),
    "--seed": ("schedule.seed", int, "random seed"),
    "--eval-interval": ("schedule.eval_interval", int, "validation loss every N steps (0: never)"),
    "--eval-iters": ("schedule.eval_iters", int, "global batches per validation"),
    "--tensor-model-parallel-size": ("parallel.tensor", int, "tensor-parallel degree"),
    "--pipeline-model-parallel-size": ("parallel.pipeline", int, "pipeline-parallel degree"),
    "--zero-stage": ("parallel.zero_stage", int, "DeepSpeed ZeRO stage 0-3"),
    "--context-parallel-size": ("parallel.context", int, "context-parallel degree (sequence split over ranks)"),
    "--n-future": ("model.n_future", int, "number of future-token heads"),
    "--rotary-base": ("model.rope_theta", float, "base of the rotary frequencies"),
    "--fim-rate": ("data.fim.rate", float, "FIM probability per document/piece"),
    "--fim-spm-rate": ("data.fim.spm_rate", float, "SPM probability among FIM pieces"),
    "--fim-split-token": ("data.fim.split_token", str, "FIM each file separately; files end at this token"),
    "--save": ("checkpoint.save", str, "checkpoint directory"),
    "--load": ("checkpoint.load", str, "resume from this checkpoint directory"),
    "--save-interval": ("checkpoint.save_interval", int, "save every N steps"),
    "--distributed-timeout-minutes": ("parallel.distributed_timeout_minutes", float,
                                      "wait at most this long for other ranks (start-up, collectives)"),
    "--deepspeed-config": ("deepspeed_config", str, "DeepSpeed JSON merged over the generated one"),
    "--profile-step-start": ("logging.profile_step_start", int, "first step recorded by torch.profiler"),
    "--profile-step-end": ("logging.profile_step_end", int, "last step recorded by torch.profiler"),
    "--profile-ranks": ("logging.profile_ranks", int, "global ranks that profile"),
    "--wandb-project": ("logging.wandb_project", str, "log the metrics to this Weights & Biases project"),
    "--wandb-exp-name": ("logging.wandb_exp_name", str, "the W&B run's name"),
    "--wandb-save-dir": ("logging.wandb_save_dir", str, "where W&B writes its local run files"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megafim.train",
        description="Train a FIM + multi-token GPT under DeepSpeed (launch with torchrun for several ranks).")
    parser.add_argument("--config", type=Path, help="YAML config file (examples/configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                        help="override any config field; the value is parsed as YAML; repeatable")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    parser.add_argument("--help-config", action="store_true",
                        help="list every setting (type, default, flag, meaning) and exit")
    parser.add_argument("--markdown", action="store_true", help="with --help-config: as docs/config_reference.md")
    for flag, (path, tp, help_text) in MEGATRON_FLAGS.items():
        nargs = "+" if flag in ("--data-path", "--profile-ranks") else None
        parser.add_argument(flag, dest="megatron:" + path, type=tp, nargs=nargs, default=None,
                            metavar=tp.__name__.upper(), help=f"{help_text} ({path})")
    parser.add_argument("--activation-checkpointing", dest="megatron:model.activation_checkpointing",
                        action="store_const", const=True, default=None,
                        help="recompute activations in backward (model.activation_checkpointing)")
    parser.add_argument("--sequence-parallel", dest="megatron:parallel.sequence_parallel",
                        action="store_const", const=True, default=None,
                        help="split activations along the sequence over tensor-parallel ranks "
                             "(parallel.sequence_parallel)")
    parser.add_argument("--reset-attention-mask", dest="megatron:data.reset_attention_mask",
                        action="store_const", const=True, default=None,
                        help="attend only within each document (data.reset_attention_mask)")
    parser.add_argument("--async-save", dest="megatron:checkpoint.async_save", action="store_const", const=True,
                        default=None, help="write checkpoints in the background (checkpoint.async_save)")
    parser.add_argument("--reset-position-ids", dest="megatron:data.reset_position_ids",
                        action="store_const", const=True, default=None,
                        help="restart positions at 0 in each document (data.reset_position_ids)")
    return parser


def _set_path(tree: dict, path: str, value, source: str) -> None:
    """Set ``tree[a][b][c] = value`` for ``path = 'a.b.c'`` (an existing field)."""
    if path.startswith("model.overrides."):  # the older spelling of model.<ModelConfig field>
        path = "model." + path[len("model.overrides."):]
    keys = path.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"{source}: {'.'.join(keys[:i + 1])} is not a section (in {path!r})")
        node = node[key]
    leaf = keys[-1]
    if leaf not in node:
        raise ConfigError(f"{source}: unknown field {path} (known here: {', '.join(sorted(node))})")
    node[leaf] = value


def parse_set(item: str) -> tuple[str, object]:
    """``'a.b=3'`` -> ``('a.b', 3)``; the value is parsed as YAML so lists and numbers work."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.field=value")
    path, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return path.strip(), value


def load_yaml(path: Path) -> dict:
    """Read a YAML config file; errors name the file (and the line for syntax errors)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse ``argv`` into the effective config (defaults < file < ``--set``/flags in order)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tree = to_dict(TrainConfig())
    if args.config is not None:
        file_tree = load_yaml(args.config)
        if isinstance(file_tree.get("model"), dict) and isinstance(file_tree["model"].get("overrides"), dict):
            file_tree["model"] = fold_model_overrides(file_tree["model"])
        # Type-check the file alone first so that errors name the file.
        from_dict(TrainConfig, merge_dicts(tree, file_tree), where=f"{args.config}: ")
        tree = merge_dicts(tree, file_tree)
    for item in args.overrides:
        path, value = parse_set(item)
        _set_path(tree, path, value, f"--set {item}")
    for key, value in vars(args).items():
        if key.startswith("megatron:") and value is not None:
            _set_path(tree, key.split(":", 1)[1], value, "command line")
    return from_dict(TrainConfig, tree, where="command line: " if args.overrides else ""), args


def dump_yaml(cfg: TrainConfig) -> str:
    """The effective config as YAML (saved beside every checkpoint, loadable with ``--config``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flag_names() -> dict[str, str]:
    """``{setting: its command-line flag}`` for the settings that have one."""
    names = {}
    for action in build_parser()._actions:  # the table's flags and the on/off switches alike
        if action.dest.startswith("megatron:") and action.option_strings:
            names.setdefault(action.dest.removeprefix("megatron:"), action.option_strings[0])
    return names


def config_reference(markdown: bool = False) -> str:
    """Every setting with its type, default, flag and meaning (``--help-config``)."""
    return (reference_markdown if markdown else reference_text)(TrainConfig, flag_names())
