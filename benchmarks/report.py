"""What every benchmark writes beside its numbers: the machine it ran on, and the JSON file itself.

    from report import command, machine, write_json      (the scripts in benchmarks/ run with this folder on sys.path)

``command()`` is the command line that produced a result, as one types it at the repository's root
(``python``, the script's path inside the checkout, the arguments as given). ``machine()`` names the CPU (from /proc/cpuinfo), its cores and memory, Python and the platform, and,
when the benchmark has imported torch, torch's version and the GPU. Numbers from different machines
must not be compared, so every result file says where it came from.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def command(argv: list[str] | None = None) -> str:
    """``argv`` (``sys.argv``) as a command to run from the repository's root: ``python`` and the
    script's path relative to the checkout, so that a result names no path of the machine that ran it."""
    argv = sys.argv if argv is None else argv
    return shlex.join(["python", shown_path(argv[0]), *argv[1:]])


def shown_command(cmd: list[str]) -> str:
    """A command a benchmark ran, as ``command()`` shows its own: ``python`` for this interpreter, and
    the paths inside the checkout relative to its root."""
    shown = ["python" if arg == sys.executable else shown_path(arg) if arg.startswith("/") else arg for arg in cmd]
    return shlex.join(shown)


def shown_path(path: str | Path) -> str:
    """``path`` relative to the repository's root when it lies inside the checkout, else as given."""
    full = Path(path).resolve()
    return full.relative_to(REPO).as_posix() if full.is_relative_to(REPO) else str(path)


def machine(note: str | None = None, **extra) -> dict:
    """The machine as a JSON-ready dict; ``note`` says how it was shared, ``extra`` adds fields."""
    out = {"cpu": cpu_name(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
           "python": platform.python_version(), "platform": platform.platform()}
    torch = sys.modules.get("torch")  # only when the benchmark uses it: importing torch takes seconds
    if torch is not None:
        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["cuda"] = torch.version.cuda
    if note:
        out["note"] = note
    out.update(extra)
    return out


def write_json(path: str | Path, doc: dict) -> Path:
    """Write ``doc`` as indented JSON (parent folders made) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return path
