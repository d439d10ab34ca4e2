"""Which settings may change when a run resumes from a checkpoint, and which may not.

The model shape (every ``ModelConfig`` field but ``activation_checkpointing``, ``max_seq_len`` and
``init_std``; n_future and the vocabulary included) never may: the weights and the optimizer state
have that shape.
The data a run trains on (the blend, the split, the FIM settings, the tokenizer) may change only on
purpose, named in ``checkpoint.allow_changes``: otherwise a resume would silently continue on other
samples. Everything else (learning rate, iterations, batch sizes, sequence length, logging...) may
change; the changes are reported so that the log says what differs from the checkpoint's run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megafim.checkpoint import files
from megafim.checkpoint.format import TOKENIZER_FILE

MODEL_MAY_CHANGE = ("activation_checkpointing", "max_seq_len", "init_std")
OVERRIDABLE = ("data.data_path", "data.split", "data.fim.rate", "data.fim.spm_rate", "data.fim.level",
               "data.fim.split_token", "data.tokenizer_model", "data.special_tokens")
_NOT_REPORTED = ("checkpoint.load", "checkpoint.save")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``model.overrides`` and ``data.special_tokens`` stay one
    value: each is one setting)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("model.overrides", "data.special_tokens"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _model_change(saved_mc, mc) -> str | None:
    old, new = dataclasses.asdict(saved_mc), dataclasses.asdict(mc)
    for name in old:
        if name not in MODEL_MAY_CHANGE and old[name] != new.get(name):
            return f"model.{name}: {new.get(name)!r} in this run, {old[name]!r} in the checkpoint"
    return None


def _tokenizer_differs(ckpt_dir: Path, tokenizer_model: str) -> bool:
    """Whether the file the checkpoint would keep of ``tokenizer_model`` (a directory's
    ``tokenizer.json``) differs from the one it kept."""
    saved = Path(ckpt_dir) / TOKENIZER_FILE
    if not saved.is_file() or not tokenizer_model:
        return False
    try:
        source = files.tokenizer_source(tokenizer_model)
    except FileNotFoundError:
        return False  # loading the tokenizer reports it
    return saved.read_bytes() != source.read_bytes()


def compare(ckpt_dir: Path, saved_mc, mc, saved_cfg: dict, cfg: dict, trained: bool,
            allow: list[str]) -> tuple[str | None, list[str]]:
    """(the first change that is refused, or None; the changes that are allowed, as text).

    ``saved_cfg`` / ``cfg``: the checkpoint's ``config.yaml`` and this run's config as nested dicts;
    ``trained``: the checkpoint comes from a training run (a converted one has no data settings)."""
    refused = _model_change(saved_mc, mc)
    if refused:
        return refused + " (the model shape cannot change on resume)", []
    old, new = flatten(saved_cfg), flatten(cfg)
    allowed = []
    for name in sorted(set(old) & set(new)):
        if old[name] == new[name] or name in _NOT_REPORTED or name.startswith("model."):
            continue
        if name == "data.tokenizer_model":
            continue  # its path may move; its content is compared below
        text = f"{name}: {old[name]!r} -> {new[name]!r}"
        if name in OVERRIDABLE and trained and name not in allow:
            return (f"{name}: {new[name]!r} in this run, {old[name]!r} in the checkpoint (the data cannot "
                    f"change on resume unless checkpoint.allow_changes names {name})"), []
        allowed.append(text)
    tokenizer = cfg["data"]["tokenizer_model"]
    if trained and "data.tokenizer_model" not in allow and _tokenizer_differs(ckpt_dir, tokenizer):
        return (f"data.tokenizer_model: {tokenizer} differs from the checkpoint's "
                f"{Path(ckpt_dir) / TOKENIZER_FILE} (the tokenizer cannot change on resume unless "
                "checkpoint.allow_changes names data.tokenizer_model)"), []
    return None, allowed
