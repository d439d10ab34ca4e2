"""``--fim-split-token`` in the trainer: the setting reaches the data config, and a token the
tokenizer lacks is one line naming the setting and the flag, exit code 2, before any process group."""

from __future__ import annotations

import pytest

from tests.data.split_tokenizer_fixtures import with_control_pieces
from tests.training.launcher import base_args, launch


def test_split_token_reaches_the_datasets(tiny_data, tmp_path):
    from megafim.data.fim import FimTransform
    from megafim.training.cli import config_from_args
    from megafim.training.config import build_data_config
    from megafim.training.loop import check_before_groups

    data, tok = tiny_data
    # a piece of the user's own (the session tokenizer already has <file_sep>): it is appended last
    repo_tok = str(with_control_pieces(tok, tmp_path / "repo.model", pieces=("<my_sep>",)))
    cfg, _ = config_from_args(base_args((data, repo_tok)) + ["--fim-rate", "0.5", "--fim-split-token", "<my_sep>"])
    tokenizer, _, _ = check_before_groups(cfg, 1)
    fim = build_data_config(cfg).fim
    assert fim.split_token == "<my_sep>"
    assert FimTransform(fim, tokenizer).split_id == tokenizer.token_id("<my_sep>") == tokenizer.vocab_size - 1


def test_missing_split_token_is_one_config_error(tiny_data, tmp_path):
    from megafim.training.cli import config_from_args
    from megafim.training.config import ConfigError
    from megafim.training.loop import check_before_groups

    cfg, _ = config_from_args(base_args(tiny_data) + ["--fim-rate", "0.5", "--fim-split-token", "<my_sep>"])
    with pytest.raises(ConfigError, match=r"^data.fim.split_token \(--fim-split-token\): '<my_sep>': tokenizer .* "
                                          "has no such token"):
        check_before_groups(cfg, 1)
    proc = launch(1, base_args(tiny_data) + ["--fim-rate", "0.5", "--fim-split-token", "<nope>"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "split_token" in ln]
    assert len(lines) == 1 and "--fim-split-token" in lines[0] and "'<nope>'" in lines[0]
