"""megafim.checkpoint.manifest: new manifests hold XXH3-64 checksums equal to a one-shot hash of each
file's bytes (the streamed hash crosses its 8 MiB blocks); manifests written before, with zlib's CRC-32
(``"algorithm": "crc32"``, or no algorithm named), still verify, in ``manifest.verify`` and in the
one-pass verified load, and still catch a corrupt file; an unknown algorithm is refused naming the
manifest."""

import json
import zlib

import pytest
import torch
import xxhash
import yaml

from megafim.checkpoint import manifest
from megafim.checkpoint.format import CheckpointError
from megafim.checkpoint.weights import write_weights_checkpoint
from megafim.inference.loading import load_model
from megafim.model import GPT, model_config


def test_streamed_checksum_equals_a_one_shot_hash(tmp_path):
    data = torch.randint(0, 256, ((8 << 20) * 2 + 12345,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert manifest.checksum_file(path) == xxhash.xxh3_64(data).hexdigest()
    assert manifest.checksum_file(path, "crc32") == f"{zlib.crc32(data):08x}"


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(model_config("tiny", n_layers=2, n_future=2))
    ckpt = write_weights_checkpoint(tmp_path / "save", model.state_dict(), model.config,
                                    yaml.safe_dump({"data": {}}), step=1)
    return ckpt, model.state_dict()


def write_old_manifest(ckpt, named: bool) -> None:
    """The manifest as the code before XXH3 wrote it: zlib's CRC-32 of each file, 8 hex digits."""
    files = {}
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"):
        files[path.relative_to(ckpt).as_posix()] = {"size": path.stat().st_size,
                                                    "crc32": f"{zlib.crc32(path.read_bytes()):08x}"}
    data = {"format_version": 2, "algorithm": "crc32", "files": files}
    if not named:
        del data["algorithm"]
    (ckpt / "manifest.json").write_text(json.dumps(data, indent=1) + "\n")


def test_a_new_manifest_uses_xxh3_and_the_verified_load_checks_it(checkpoint):
    ckpt, state = checkpoint
    data = json.loads((ckpt / "manifest.json").read_text())
    assert data["algorithm"] == "xxh3_64"
    for rel, entry in data["files"].items():
        assert entry["xxh3_64"] == xxhash.xxh3_64((ckpt / rel).read_bytes()).hexdigest()
    loaded = load_model(ckpt, verify=True).model.state_dict()
    assert all(torch.equal(loaded[name], state[name]) for name in state)


@pytest.mark.parametrize("named", [True, False], ids=["crc32-named", "no-algorithm"])
def test_an_old_crc32_manifest_still_verifies_and_catches_corruption(checkpoint, named):
    ckpt, state = checkpoint
    write_old_manifest(ckpt, named)
    assert manifest.verify(ckpt) is True
    loaded = load_model(ckpt, verify=True).model.state_dict()
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    shard = next((ckpt / "model").glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: checksum [0-9a-f]{{8}} does not match"):
        manifest.verify(ckpt)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: checksum [0-9a-f]{{8}} does not match"):
        load_model(ckpt, verify=True)


def test_an_unknown_algorithm_is_refused_naming_the_manifest(checkpoint):
    ckpt, _ = checkpoint
    data = json.loads((ckpt / "manifest.json").read_text())
    data["algorithm"] = "md5"
    (ckpt / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"manifest.json: not a valid checkpoint manifest \(algorithm 'md5'"):
        manifest.verify(ckpt)
