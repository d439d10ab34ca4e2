"""Run one stage of an example as a subprocess, its output appended to a log file (shared by the
examples that print each command they run)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path


def run_logged(cmd: list[str], log: Path, cwd: Path, error: type[Exception]) -> None:
    """Run ``cmd`` (``cmd[0]`` the interpreter or launcher) from ``cwd``, printing it as a user would type
    it; on failure raise ``error`` naming ``cmd[1]`` with the tail of the log."""
    print("$ " + shlex.join(cmd).replace(sys.executable, "python"), flush=True)
    with open(log, "a", encoding="utf-8") as out:
        code = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise error(f"{cmd[1]} failed with exit code {code}; log {log}:\n{tail}")
