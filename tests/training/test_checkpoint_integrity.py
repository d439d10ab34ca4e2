"""The manifest (a checksum per file, verified on load), the fallback to an older checkpoint, the
choice of the directory to resume from, the settings that may not change on resume, and one-line
errors that name the file."""

import json

import pytest

from megafim.checkpoint import compat, engine, files, find, manifest
from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.state import TrainerState, read_trainer_state, write_trainer_state
from megafim.model import model_config
from megafim.training.checkpoint_resume import load_dir
from megafim.training.config import ConfigError, TrainConfig, to_dict


def _save(root, step, payload=b"x" * 1000):
    tmp = files.begin(root, step)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "blob.bin").write_bytes(payload)
    write_trainer_state(tmp, TrainerState(step=step, layout={"tensor": 1}), "a: 1\n")
    return files.commit(root, step, keep_last=0)


def test_manifest_lists_every_file_with_its_checksum(tmp_path):
    import xxhash

    ckpt = _save(tmp_path, 3, payload=b"abc" * 5000)
    data = json.loads((ckpt / "manifest.json").read_text())
    assert sorted(data["files"]) == ["config.yaml", "sub/blob.bin", "trainer_state.json"]
    assert data["algorithm"] == "xxh3_64"
    entry = data["files"]["sub/blob.bin"]
    assert entry == {"size": 15000, "xxh3_64": xxhash.xxh3_64(b"abc" * 5000).hexdigest()}  # one-shot hash
    assert manifest.verify(ckpt) is True


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_file_is_refused_with_its_name(tmp_path, damage):
    ckpt = _save(tmp_path, 1)
    blob = ckpt / "sub" / "blob.bin"
    if damage == "flip":
        raw = bytearray(blob.read_bytes())
        raw[500] ^= 1
        blob.write_bytes(bytes(raw))
    elif damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:-1])
    else:
        blob.unlink()
    with pytest.raises(CheckpointError, match=r"sub/blob\.bin"):
        manifest.verify(ckpt)
    with pytest.raises(CheckpointError, match=r"sub/blob\.bin"):  # named directly: refused, no fallback
        find.verified_for_resume(ckpt, True, print)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    _save(tmp_path, 1), _save(tmp_path, 2), _save(tmp_path, 3)
    for step in (3, 2):
        (tmp_path / f"step_0000000{step}" / "sub" / "blob.bin").write_bytes(b"y" * 1000)  # same size
    notes = []
    assert find.verified_for_resume(tmp_path, True, notes.append).name == "step_00000001"
    assert len(notes) == 2 and "step_00000003" in notes[0] and "checksum" in notes[0]
    assert find.verified_for_resume(tmp_path, False, notes.append).name == "step_00000003"
    (tmp_path / "step_00000001" / "sub" / "blob.bin").unlink()
    with pytest.raises(CheckpointError, match="none of its 3 checkpoints verifies"):
        find.verified_for_resume(tmp_path, True, notes.append)


def test_a_checkpoint_without_manifest_loads_unverified_and_says_so(tmp_path):
    ckpt = _save(tmp_path, 1)
    (ckpt / "manifest.json").unlink()
    notes = []
    assert find.verified_for_resume(tmp_path, True, notes.append) == ckpt
    assert "no manifest" in notes[0]


def test_bad_trainer_state_and_missing_ds_name_the_file(tmp_path):
    ckpt = _save(tmp_path, 1)
    (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step_00000001/trainer_state.json: not valid JSON"):
        read_trainer_state(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_trainer_state(ckpt)
    with pytest.raises(CheckpointError, match=r"step_00000001/ds: missing"):
        engine.load_engine_state(ckpt, None)  # refused before DeepSpeed is asked


def _cfg(**data):
    cfg = TrainConfig()
    cfg.data.data_path = ["/data/a_text_document"]
    for key, value in data.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_model_shape_and_data_may_not_change_the_rest_is_reported(tmp_path):
    mc = model_config("tiny", n_layers=3, n_future=2)
    saved = to_dict(_cfg())
    refused, _ = compat.compare(tmp_path, mc, mc.replace(n_future=3), saved, to_dict(_cfg()), True, [])
    assert refused.startswith("model.n_future: 3 in this run, 2 in the checkpoint")
    refused, _ = compat.compare(tmp_path, mc, mc.replace(vocab_size=1024), saved, to_dict(_cfg()), True, [])
    assert refused.startswith("model.vocab_size")
    refused, changed = compat.compare(tmp_path, mc, mc.replace(max_seq_len=512), saved,
                                      to_dict(_cfg(optimizer__lr=5e-4, schedule__train_iters=9)), True, [])
    assert refused is None
    assert changed == ["optimizer.lr: 0.0003 -> 0.0005", "schedule.train_iters: 100 -> 9"]
    moved = to_dict(_cfg(data__data_path=["/data/b_text_document"]))
    refused, _ = compat.compare(tmp_path, mc, mc, saved, moved, True, [])
    assert refused.startswith("data.data_path") and "checkpoint.allow_changes" in refused
    assert compat.compare(tmp_path, mc, mc, saved, moved, True, ["data.data_path"]) == \
        (None, ["data.data_path: ['/data/a_text_document'] -> ['/data/b_text_document']"])
    assert compat.compare(tmp_path, mc, mc, saved, moved, False, [])[0] is None  # a converted checkpoint
    fim = to_dict(_cfg())
    fim["data"]["fim"]["rate"] = 0.9
    assert compat.compare(tmp_path, mc, mc, saved, fim, True, [])[0].startswith("data.fim.rate")
    per_file = to_dict(_cfg())
    per_file["data"]["fim"]["split_token"] = "<file_sep>"  # other samples: refused unless allowed
    assert compat.compare(tmp_path, mc, mc, saved, per_file, True, [])[0].startswith("data.fim.split_token")
    assert compat.compare(tmp_path, mc, mc, saved, per_file, True, ["data.fim.split_token"])[0] is None


def test_a_changed_tokenizer_is_refused(tmp_path):
    mc = model_config("tiny", n_layers=3)
    (tmp_path / "tokenizer.model").write_bytes(b"old")
    (tmp_path / "new.model").write_bytes(b"new")
    cfg = to_dict(_cfg())
    cfg["data"]["tokenizer_model"] = str(tmp_path / "new.model")
    refused, _ = compat.compare(tmp_path, mc, mc, to_dict(_cfg()), cfg, True, [])
    assert refused.startswith("data.tokenizer_model")


def test_where_a_run_resumes_from(tmp_path):
    save, other = tmp_path / "save", tmp_path / "other"
    notes = []
    cfg = _cfg(checkpoint__save=str(save))
    assert load_dir(cfg, notes) == "" and notes == []  # a fresh run
    cfg = _cfg(checkpoint__save=str(save), checkpoint__load=str(save))
    assert load_dir(cfg, notes) == "" and "starting from scratch" in notes[-1]  # --save D --load D: fresh
    with pytest.raises(ConfigError, match=f"checkpoint.load: {other} holds no checkpoint"):
        load_dir(_cfg(checkpoint__save=str(save), checkpoint__load=str(other)), notes)
    _save(save, 4)
    assert load_dir(_cfg(checkpoint__save=str(save)), notes) == str(save)  # --load defaults to --save
    assert "resuming from it" in notes[-1]


def test_allow_changes_names_only_data_settings():
    from megafim.training.config import validate

    cfg = _cfg(checkpoint__allow_changes=["model.n_future"])
    with pytest.raises(ConfigError, match="checkpoint.allow_changes: 'model.n_future'"):
        validate(cfg, 1)


@pytest.mark.slow
def test_trainer_falls_back_past_a_corrupt_checkpoint_and_refuses_a_changed_shape(tiny_data, tmp_path):
    from tests.training.launcher import base_args, check, launch, metrics

    save = tmp_path / "run"
    args = base_args(tiny_data) + ["--zero-stage", "0", "--save", str(save)]
    check(launch(1, args + ["--train-iters", "4", "--save-interval", "2"], tmp_path))
    stage = save / "step_00000004" / "model" / "tp00_pp00.safetensors"
    raw = bytearray(stage.read_bytes())
    raw[-3] ^= 0xFF
    stage.write_bytes(bytes(raw))
    proc = launch(1, args + ["--train-iters", "5", "--n-future", "3"], tmp_path)
    check(proc, 2)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megafim.train: error: model.n_future: 3 in this run")
    proc = launch(1, args + ["--train-iters", "5", "--load", str(save / "step_00000004")], tmp_path)
    check(proc, 2)
    assert "tp00_pp00.safetensors: checksum" in proc.stderr.strip().splitlines()[-1]
    proc = launch(1, args + ["--train-iters", "5"], tmp_path)  # --load defaults to --save
    check(proc)
    assert "skipping step_00000004" in proc.stdout and "from " + str(save / "step_00000002") in proc.stdout
    assert [r["step"] for r in metrics(save)] == [1, 2, 3, 4, 5]
