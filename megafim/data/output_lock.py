"""One writer at a time per output dataset: a lock file beside ``<prefix>.bin/.idx``.

Two runs writing the same prefix at once would each rename their own ``.bin`` and ``.idx`` into place,
and could leave the ``.bin`` of one with the ``.idx`` of the other. Every writer in megafim
(``run_preprocess``, ``IndexedDatasetBuilder``) therefore holds ``<prefix>.lock`` while it writes; a
second one fails at once, naming the holder's pid. The lock is an ``flock`` on that file, so the
kernel releases it when its process dies however it dies (``kill -9`` included): a lock file left
behind is not held, and the next run simply takes it. Holding the lock also means that no writer is
active at the prefix, so the ``*.tmp-<pid>-<n>`` files of a killed run found there are removed.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re

TEMPORARY_KINDS = (".bin", ".idx", ".lengths", ".docs")  # csrc/indexed_writer.h's temporary files
_TMP_PID = re.compile(r"\.tmp-(\d+)-\d+$")


class DatasetLockedError(RuntimeError):
    """Another process is writing the same dataset now."""


def lock_path(prefix: str) -> str:
    return f"{prefix}.lock"


class OutputLock:
    """Holds ``<prefix>.lock`` for every prefix given (sorted, so two holders never wait on each other).

    ``acquire()`` fails with ``DatasetLockedError`` when another process holds one of them; it then holds
    none. ``removed`` lists the temporary files of dead writers that were cleaned up.
    """

    def __init__(self, prefixes: list[str] | tuple[str, ...] | str) -> None:
        if isinstance(prefixes, (str, os.PathLike)):
            prefixes = [os.fspath(prefixes)]
        self.prefixes = sorted({os.fspath(p) for p in prefixes})
        self.removed: list[str] = []
        self._fds: dict[str, int] = {}

    def acquire(self) -> "OutputLock":
        try:
            for prefix in self.prefixes:
                self._fds[prefix] = _lock(prefix)
        except BaseException:
            self.release()
            raise
        for prefix in self.prefixes:
            self.removed += remove_dead_temporaries(prefix)
        return self

    def release(self) -> None:
        """Remove the lock files (while still holding them) and unlock; safe to call twice."""
        for prefix, fd in self._fds.items():
            try:
                os.unlink(lock_path(prefix))
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(prefix: str) -> int:
    path = lock_path(prefix)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatasetLockedError(
                f"{prefix}.bin/.idx: another process (pid {holder}) is writing this dataset now "
                f"(it holds {path}); wait for it to finish, or write to another prefix") from None
        # The previous holder unlinks the file before unlocking it: if that happened between our open
        # and our flock, we locked a file nobody else can find, so start over on the current one.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_temporaries(prefix: str) -> list[str]:
    """Remove ``<prefix>{.bin,.idx,...}.tmp-<pid>-<n>`` whose writing process is gone; returns them.

    Called with the prefix's lock held. The pid check keeps the files of a live writer that does not
    take the lock (an older megafim, another tool) out of harm's way.
    """
    removed = []
    for kind in TEMPORARY_KINDS:
        for path in sorted(glob.glob(glob.escape(prefix + kind) + ".tmp-*")):
            m = _TMP_PID.search(path)
            if m is None or _alive(int(m.group(1))):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed
