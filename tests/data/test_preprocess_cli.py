"""tools/preprocess_data.py as users run it: the closing summary, and interrupted runs (Ctrl-C, kill,
kill -9) that must never leave a .bin/.idx pair that looks valid nor touch an earlier output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megafim.data.indexed import IndexedDataset
from tests.data.hf_tokenizer_fixtures import hf_dir, llama3_fim, llama3_plain  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "preprocess_data.py"


def tool_cmd(inputs, prefix, model, *extra) -> list[str]:
    return [sys.executable, str(TOOL), "--input", *map(str, inputs), "--output-prefix", str(prefix),
            "--tokenizer-model", str(model), "--quiet", *extra]


def test_cli_summary_and_json(tmp_path, small_tokenizer_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a = 1\\n"}\n{"text": ""}\nnot json\n{"text": "b = 2\\n"}\n')
    out = subprocess.run(tool_cmd([src], tmp_path / "o", small_tokenizer_path, "--append-eod", "--workers", "2",
                                  "--summary-json", tmp_path / "s.json"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "documents: 2" in out.stderr
    assert f"empty_document: 1 (first: {src}:2)" in out.stderr
    assert f"malformed_json: 1 (first: {src}:3)" in out.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["documents"] == 2 and summary["skipped"] == {"empty_document": 1, "malformed_json": 1}
    assert len(IndexedDataset(tmp_path / "o_text_document")) == 2

    strict = subprocess.run(tool_cmd([src], tmp_path / "s", small_tokenizer_path, "--strict"),
                            capture_output=True, text=True)
    assert strict.returncode == 2 and f"{src}:2: empty_document" in strict.stderr
    assert not list(tmp_path.glob("s_*"))


def test_cli_hugging_face_tokenizer(tmp_path, llama3_fim):  # noqa: F811
    from megafim.data.tokenizer import load_tokenizer

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a = 1\\n"}\n{"text": "日本 b"}\n')
    out = subprocess.run(tool_cmd([src], tmp_path / "o", llama3_fim, "--append-eod",
                                  "--tokenizer-type", "HuggingFaceTokenizer"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    tok = load_tokenizer(llama3_fim)
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert [ds[i].tolist() for i in range(2)] == [tok.encode("a = 1\n") + [tok.eod], tok.encode("日本 b") + [tok.eod]]
    bad = subprocess.run(tool_cmd([src], tmp_path / "p", llama3_fim, "--tokenizer-type", "Llama"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--tokenizer-type" in bad.stderr
    # a special token named by its spelling: here end-of-text is the pad token
    named = subprocess.run(tool_cmd([src], tmp_path / "n", llama3_fim, "--append-eod", "--special-token",
                                    "eod=<|fim_pad|>"), capture_output=True, text=True)
    assert named.returncode == 0, named.stderr
    assert IndexedDataset(tmp_path / "n_text_document")[0].tolist()[-1] == tok.fim_pad
    for item, message in [("eod", "expected NAME=SPELLING"), ("eod=<nope>", "no token '<nope>' (named as eod)")]:
        bad = subprocess.run(tool_cmd([src], tmp_path / "q", llama3_fim, "--special-token", item),
                             capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and bad.stderr.count("\n") == 1


def open_when_read(fifo: Path, proc: subprocess.Popen):
    """Open the pipe for writing once the tool has opened it for reading (failing if the tool died)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO: no reader yet
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the tool never opened its input"
            time.sleep(0.01)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "w")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_leaves_no_valid_looking_pair(tmp_path, small_tokenizer_path, sig):
    # An earlier, valid output at the same prefix must survive untouched.
    old = tmp_path / "old.jsonl"
    old.write_text('{"text": "the earlier dataset"}\n')
    subprocess.run(tool_cmd([old], tmp_path / "o", small_tokenizer_path), check=True, capture_output=True)
    prefix = tmp_path / "o_text_document"
    before = prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()

    # The input is a pipe that we feed: the run is certainly in the middle when the signal comes.
    fifo = tmp_path / "feed.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(tool_cmd([fifo], tmp_path / "o", small_tokenizer_path, "--workers", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open_when_read(fifo, proc) as feed:
        for i in range(60_000):  # ~2 MB, two blocks: some jobs are written before the signal
            feed.write(json.dumps({"text": f"def f_{i}(x):\n    return x * {i}\n"}) + "\n")
        feed.flush()
        assert list(tmp_path.glob("o_text_document.bin.tmp-*")), "the run has not started writing"
        proc.send_signal(sig)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig], err
    after = prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()
    assert after == before
    assert len(IndexedDataset(prefix)) == 1
    leftovers = sorted(p.name for p in tmp_path.glob("*.tmp-*"))
    if sig == signal.SIGKILL:  # nothing can clean up; what is left never has a dataset's name
        assert leftovers and all(".tmp-" in name for name in leftovers)
    else:
        assert leftovers == [], err
        assert b"interrupted; no outputs were written" in err
    # the lock file stays after kill -9 (unheld: the kernel dropped the lock with the process)
    lock = ["o_text_document.lock"] if sig == signal.SIGKILL else []
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" not in p.name) == sorted([
        "feed.jsonl", "o_text_document.bin", "o_text_document.idx", "old.jsonl", *lock])
    if sig == signal.SIGKILL:  # the next run at the prefix takes the lock and cleans up
        again = subprocess.run(tool_cmd([old], tmp_path / "o", small_tokenizer_path), capture_output=True,
                               text=True)
        assert again.returncode == 0, again.stderr
        assert f"removed {len(leftovers)} temporary file(s) left by an interrupted run" in again.stderr
        assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.lock"))


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The tool failed as it must on bad input: exit code 2 and exactly one line on stderr."""
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("preprocess_data: error: "), out.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["wrong_key", "binary_source", "empty_file", "blank_lines"])
def test_every_document_skipped_fails_and_writes_nothing(tmp_path, small_tokenizer_path, case):
    # An earlier dataset at the same prefix is kept as it was.
    old = tmp_path / "old.jsonl"
    old.write_text('{"text": "the earlier dataset"}\n')
    subprocess.run(tool_cmd([old], tmp_path / "o", small_tokenizer_path), check=True, capture_output=True)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.glob("o_*"))
    extra: list[str] = []
    if case == "wrong_key":
        src = tmp_path / "in.jsonl"
        src.write_text('{"text": "a = 1"}\n{"text": "b = 2"}\n{"text": "c = 3"}\n')
        extra = ["--json-keys", "txt"]
        prefix = tmp_path / "o"  # writes o_txt_document: must not appear
    elif case == "binary_source":
        src = tmp_path / "blob.py"
        src.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 10)
        prefix = tmp_path / "o"
    else:
        src = tmp_path / "in.jsonl"
        src.write_text("" if case == "empty_file" else "\n\n  \n")
        prefix = tmp_path / "o"
    line = one_line_error(subprocess.run(tool_cmd([src], prefix, small_tokenizer_path, *extra),
                                         capture_output=True, text=True))
    assert "no documents" in line and "wrote nothing" in line
    if case == "wrong_key":
        assert f"missing_key 3 (first: {src}:1, {src}:2)" in line and "json_keys ['txt']" in line
    elif case == "binary_source":
        assert f"invalid_utf8 1 (first: {src}:" in line
    elif case == "blank_lines":
        assert "only 3 blank line(s)" in line
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.glob("o_*")) == before


def test_unwritable_outputs_are_one_line_errors(tmp_path, small_tokenizer_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"x_{i} = {i}\n" * 20}) + "\n" for i in range(400)))

    # a prefix below a regular file: say which part is a file, not "File exists"
    (tmp_path / "afile").write_text("")
    line = one_line_error(subprocess.run(tool_cmd([src], tmp_path / "afile" / "sub" / "o", small_tokenizer_path),
                                         capture_output=True, text=True))
    assert f"{tmp_path / 'afile'} is a file, not a directory" in line

    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        line = one_line_error(subprocess.run(tool_cmd([src], ro / "o", small_tokenizer_path),
                                             capture_output=True, text=True))
        assert f"the directory {ro} is not writable" in line
        ro.chmod(0o755)

    # a file-size limit reached while writing (EFBIG from the C++ writer): one line naming the file
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    line = one_line_error(subprocess.run(tool_cmd([src], tmp_path / "big", small_tokenizer_path),
                                         capture_output=True, text=True, preexec_fn=small_files))
    assert "File too large" in line and str(tmp_path / "big_text_document") in line
    assert not list(tmp_path.glob("big_*"))


def test_a_second_writer_at_the_same_prefix_fails(tmp_path, small_tokenizer_path):
    """Deterministically: the test holds the prefix's lock as a running preprocess_data would."""
    import fcntl

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a = 1"}\n')
    subprocess.run(tool_cmd([src], tmp_path / "o", small_tokenizer_path), check=True, capture_output=True)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.glob("o_*"))
    lock = tmp_path / "o_text_document.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        line = one_line_error(subprocess.run(tool_cmd([src], tmp_path / "o", small_tokenizer_path),
                                             capture_output=True, text=True))
        assert "another process (pid 4242) is writing this dataset now" in line and str(lock) in line
        assert sorted((p.name, p.read_bytes()) for p in tmp_path.glob("o_*") if p != lock) == before
        assert not list(tmp_path.glob("*.tmp-*"))
    # released (as at the holder's exit, however it ended): the next run goes ahead and removes the file
    out = subprocess.run(tool_cmd([src], tmp_path / "o", small_tokenizer_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not lock.exists()
