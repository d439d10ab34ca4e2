"""megafim/data/output_lock.py: one writer per dataset prefix, stale locks and temporaries handled."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from megafim.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megafim.data.output_lock import DatasetLockedError, OutputLock, lock_path, remove_dead_temporaries


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_prefix_cannot_be_locked_again(tmp_path):
    prefix = str(tmp_path / "d")
    with OutputLock([prefix]):
        assert open(lock_path(prefix)).read().strip() != ""
        with pytest.raises(DatasetLockedError, match=r"d\.bin/\.idx: another process \(pid \d+\)"):
            OutputLock(prefix).acquire()
        # a writer of the same prefix through the builder is refused too, and writes nothing
        with pytest.raises(DatasetLockedError):
            IndexedDatasetBuilder(prefix)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.lock"]
    assert not (tmp_path / "d.lock").exists()
    with OutputLock(prefix):  # free again
        pass


def test_a_failed_acquire_holds_nothing(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with OutputLock(b):
        with pytest.raises(DatasetLockedError):
            OutputLock([a, b]).acquire()  # took a, failed on b: a must be free again
        with OutputLock(a):
            pass


def test_a_stale_lock_file_is_taken_over(tmp_path):
    prefix = str(tmp_path / "d")
    (tmp_path / "d.lock").write_text(f"{dead_pid()}\n")  # left by a killed run: a file, but unheld
    with IndexedDatasetBuilder(prefix) as builder:
        builder.add_document([1, 2, 3])
    assert [int(t) for t in IndexedDataset(prefix).get(0)] == [1, 2, 3]
    assert not (tmp_path / "d.lock").exists()


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    prefix = str(tmp_path / "d")
    gone, alive = dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_files = [f"{prefix}{kind}.tmp-{gone}-0" for kind in (".bin", ".idx", ".lengths", ".docs")]
        live_file = f"{prefix}.bin.tmp-{alive.pid}-0"
        other = str(tmp_path / "dd.bin.tmp-1-0")  # another prefix: not ours to touch
        for f in (*dead_files, live_file, other):
            open(f, "w").close()
        with OutputLock(prefix) as lock:
            assert sorted(lock.removed) == sorted(dead_files)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f"d.bin.tmp-{alive.pid}-0", "dd.bin.tmp-1-0"])
        assert remove_dead_temporaries(prefix) == []
    finally:
        alive.kill()
        alive.wait()
    np.testing.assert_equal(remove_dead_temporaries(prefix), [f"{prefix}.bin.tmp-{alive.pid}-0"])
