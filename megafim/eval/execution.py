"""Run untrusted, model-generated code against a trusted test, in a disposable sandbox.

WARNING: the code comes from a language model and may do anything Python can do. This module
contains it as well as an unprivileged Linux process can (see docs/evaluation.md), but it is not a
security boundary against a determined attacker: no filesystem isolation beyond permissions and a
private /tmp, no cgroup. Run evaluations inside a container or VM you can throw away.

A ``Check`` is split in two on purpose: the untrusted ``code`` runs in one process, the trusted
``test`` (``def check(candidate): ...``) in another, which calls the code's ``entry_point`` with
plain values through a pipe and alone writes the verdict (``megafim/eval/sandbox_runner.py``). So
the code cannot forge a pass: whatever it runs, patches, writes or reads in its own process, the
test's assertions are evaluated where it cannot reach.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

# subprocess and concurrent.futures are imported where used, so importing this module is cheap.

_RUNNER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one check. The defaults suit HumanEval-sized tests."""

    timeout_s: float = 5.0
    """Wall-clock limit per check, seconds; past it the result is ``timed out``."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of the code process and of the test process, MiB."""
    max_file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE), MiB."""
    max_disk_mb: int = 64
    """Total size of the private tmpfs that holds the code's working directory, /tmp, /var/tmp
    and /dev/shm (with ``private_mounts``), MiB; it disappears with the check."""
    max_procs: int = 16
    """Processes and threads the code may own (RLIMIT_NPROC): bounds fork bombs."""
    max_open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    isolate_network: bool = True
    """Run in a new network namespace (no interfaces up) where the OS permits it."""
    private_mounts: bool = True
    """A private mount namespace where the OS permits it: a /proc showing only the sandbox's own
    processes, and the capped tmpfs of ``max_disk_mb``."""
    drop_privileges: bool = True
    """When started as root, run the code as a per-task unprivileged uid (``nobody`` as fallback)."""
    uid_base: int = 1_900_000
    """Per-task uid = uid_base + runner pid (the test process: + 2**22), so concurrent tasks
    cannot signal each other."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxConfig.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "max_file_mb", "max_disk_mb", "max_procs", "max_open_files"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SandboxConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_open_files < 16:
            raise ValueError("SandboxConfig.max_open_files must be >= 16 (Python needs a few)")
        if not 0 < self.uid_base < 2**31 - 2**23:
            raise ValueError(f"SandboxConfig.uid_base out of range: {self.uid_base}")

    @property
    def cpu_s(self) -> int:
        """CPU-time limit (RLIMIT_CPU): a little above the wall-clock limit."""
        return int(self.timeout_s) + 2


@dataclass(frozen=True)
class Check:
    """One sample to judge: ``code`` is untrusted; ``test`` and ``context`` are trusted text."""

    code: str
    """The program under test (e.g. prompt + completion + suffix); must define ``entry_point``."""
    entry_point: str
    """The function the test calls (``check(candidate)`` receives a proxy of it)."""
    test: str
    """Defines ``check(candidate)``; raising fails the sample."""
    context: str = ""
    """Definitions the test may use besides the candidate (e.g. the reference program, whose
    helper functions some HumanEval tests call); run only in the test process."""


@dataclass(frozen=True)
class ExecutionResult:
    """``result`` is ``passed``, ``timed out`` or ``failed: <reason>`` (an exception type name,
    ``exited before the tests finished (code N)``, ``killed by signal NAME``, ...)."""

    passed: bool
    result: str


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code): the evaluation cannot be trusted."""


def run_check(check: Check, config: SandboxConfig = SandboxConfig()) -> ExecutionResult:
    """Run one check in a fresh sandbox and return its verdict."""
    return _parse_report(*_run_runner(check, config, report=False))[0]


def run_checks(
    checks: Sequence[Check],
    config: SandboxConfig = SandboxConfig(),
    workers: int = 0,
    on_result: Callable[[int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """Run many checks, ``workers`` at a time (0: one per CPU), results in input order. A check
    whose sandbox failed gets ``error: ...`` (not passed) and the others go on; after all of them,
    ``SandboxError`` is raised if any did, so the caller can keep the results first."""
    from concurrent.futures import ThreadPoolExecutor

    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    workers = workers or os.cpu_count() or 1
    results: list[ExecutionResult | None] = [None] * len(checks)

    def one(i: int) -> None:
        try:
            results[i] = run_check(checks[i], config)
        except SandboxError as exc:
            results[i] = ExecutionResult(False, f"error: {exc}")
        if on_result is not None:
            on_result(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(one, i) for i in range(len(checks))]:
            future.result()
    return results  # type: ignore[return-value]


def sandbox_errors(results: Sequence[ExecutionResult]) -> list[str]:
    """The ``error: ...`` results of ``run_checks`` (sandbox failures, not the code's)."""
    return [r.result for r in results if r.result.startswith("error: ")]


def isolation_report(config: SandboxConfig = SandboxConfig()) -> dict:
    """What isolation the sandbox achieves on this machine (runs one trivial check)."""
    check = Check("def f():\n    return 1\n", "f", "def check(c):\n    assert c() == 1\n")
    result, report = _parse_report(*_run_runner(check, config, report=True))
    if not result.passed:
        raise SandboxError(f"the sandbox fails a trivial check: {result.result}")
    return report["isolation"]


def isolation_notes(isolation: dict) -> list[str]:
    """One line for each protection this machine did not give (for the log)."""
    notes = {
        "pid_namespace": "no PID namespace: the code can see and signal processes of its uid",
        "network_namespace": "no network namespace: the code can open network connections",
        "private_proc": "no private /proc: the code can read other processes' command lines",
        "private_tmp": "no private tmpfs: files the code writes outside its working directory "
                       "(e.g. /tmp) stay, and only RLIMIT_FSIZE caps their size",
    }
    return [f"sandbox note: {text}" for key, text in notes.items() if not isolation.get(key)]


def _run_runner(check: Check, config: SandboxConfig, report: bool) -> tuple[int | None, bytes,
                                                                              bytes]:
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-I", _RUNNER_PATH],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,  # our signals and terminal never reach it, nor its ours
        env=_runner_env(),
    )
    try:
        # The runner enforces the timeout itself; this backstop only catches a stuck runner.
        out, err = proc.communicate(_request(check, config, report), timeout=config.timeout_s + 30)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        return None, b'{"status": "timed out"}', b""
    return proc.returncode, out, err


def _parse_report(returncode: int | None, out: bytes, err: bytes) -> tuple[ExecutionResult, dict]:
    """The runner's one JSON line. Anything else fails the sample with a reason (a killed runner)
    or, when the runner itself broke, raises SandboxError."""
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    if not isinstance(report, dict) or report.get("status") not in (
            "passed", "failed", "timed out", "error"):
        if returncode is not None and returncode < 0:
            return ExecutionResult(False, f"failed: sandbox runner {_describe(returncode)}"), {}
        tail = err.decode("utf-8", "replace").strip()[-2000:]
        raise SandboxError(f"sandbox runner gave no verdict ({_describe(returncode)}): {tail}")
    if report["status"] == "error":
        raise SandboxError(f"sandbox set-up failed: {report.get('detail')}")
    if report["status"] == "failed":
        return ExecutionResult(False, f"failed: {report.get('detail')}"), report
    return ExecutionResult(report["status"] == "passed", report["status"]), report


def _runner_env() -> dict[str, str]:
    """Nothing of the harness's environment but where to find programs and temporary space."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


def _request(check: Check, config: SandboxConfig, report: bool) -> bytes:
    """The runner's stdin: the part every process may see, then the test (read by T only)."""
    settings = dict(asdict(config), cpu_s=config.cpu_s)
    head = json.dumps({"code": check.code, "entry_point": check.entry_point,
                       "config": settings, "report": report}).encode()
    tail = json.dumps({"test": check.test, "context": check.context}).encode()
    return b"%d\n" % len(head) + head + tail


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe(returncode: int | None) -> str:
    if returncode is None or returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"killed by signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
