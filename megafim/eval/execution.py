"""Run untrusted, model-generated Python programs in a disposable sandbox.

WARNING: the programs come from a language model and may do anything Python can do. This module
contains them as well as an unprivileged Linux process can (see docs/evaluation.md), but it is not a
security boundary against a determined attacker: it has no filesystem isolation beyond permissions
and no cgroup. Run evaluations inside a container or VM you can throw away.

Each program runs like this (three processes, so that the code's parent is disposable):

    harness thread --(subprocess, new session)--> runner A   (``python -I execution.py``)
        A: fresh temporary directory; unshare(NEWNET | NEWPID) where permitted; fork
        B: reaper (PID 1 of the new PID namespace, else a child subreaper); dies with A; fork
        C: new session, stdio to /dev/null, unprivileged uid when root, resource limits,
           ``exec`` of the program; writes one JSON line to a pipe only A reads

A kills everything when the result arrives, when B ends, or at the wall-clock timeout, removes the
directory and prints one JSON line for the harness. Whatever the code does (``exit()``,
``os._exit``, killing its parent, fork bombs, hanging, writing files, printing megabytes) it can only
change its own result. The runner side of this file imports nothing outside the standard library,
because it runs as a script in a bare ``python -I``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

# subprocess and concurrent.futures are imported where used: the runner (this file as a script,
# once per program) starts faster without them.

NOBODY_UID = 65534
_RUNNER_PATH = os.path.abspath(__file__)
# Linux clone flags (sched.h) and prctl options (prctl.h); used through ctypes because the os module
# exposes unshare only from Python 3.12.
_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one program. The defaults suit HumanEval-sized tests."""

    timeout_s: float = 5.0
    """Wall-clock limit per program, seconds; past it the result is ``timed out``."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of the code process, MiB."""
    max_file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE), MiB."""
    max_procs: int = 16
    """Processes and threads the code may own (RLIMIT_NPROC): bounds fork bombs."""
    max_open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    isolate_network: bool = True
    """Run in a new network namespace (no interfaces up) where the OS permits it."""
    drop_privileges: bool = True
    """When started as root, run the code as a per-task unprivileged uid (``nobody`` as fallback)."""
    uid_base: int = 1_900_000
    """Per-task uid = uid_base + runner pid, so concurrent tasks cannot signal each other."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxConfig.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "max_file_mb", "max_procs", "max_open_files"):
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
class ExecutionResult:
    """``result`` is ``passed``, ``timed out`` or ``failed: <reason>`` (an exception type name,
    ``exited before the tests finished (code N)`` or ``killed by signal NAME``)."""

    passed: bool
    result: str


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): the evaluation cannot be trusted."""


# ----------------------------------------------------------------------------------------------
# Harness side
# ----------------------------------------------------------------------------------------------


def run_program(program: str, config: SandboxConfig = SandboxConfig()) -> ExecutionResult:
    """Run one program in a fresh sandbox and return how it ended."""
    import subprocess

    request = _request(program, config)
    proc = subprocess.Popen(
        [sys.executable, "-I", _RUNNER_PATH],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # our signals and terminal never reach it, nor its ours
        env=_runner_env(),
    )
    try:
        # The runner enforces the timeout itself; this backstop only catches a stuck runner.
        out, err = proc.communicate(request, timeout=config.timeout_s + 30)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        return ExecutionResult(False, "timed out")
    line = out.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0 or not line:
        reason = _describe_status(proc.returncode)
        tail = err.decode("utf-8", "replace").strip()[-2000:]
        if proc.returncode is not None and proc.returncode < 0:
            # Only the code (same uid, no namespaces) can kill the runner: count it against the code.
            return ExecutionResult(False, f"failed: sandbox runner {reason}")
        raise SandboxError(f"sandbox runner failed ({reason}): {tail}")
    report = json.loads(line[-1])
    if report["status"] == "error":
        raise SandboxError(f"sandbox set-up failed: {report['detail']}")
    return ExecutionResult(report["status"] == "passed", _result_text(report))


def run_programs(
    programs: Sequence[str],
    config: SandboxConfig = SandboxConfig(),
    workers: int = 0,
    on_result: Callable[[int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """Run many programs, ``workers`` at a time (0: one per CPU), results in input order."""
    from concurrent.futures import ThreadPoolExecutor

    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    workers = workers or os.cpu_count() or 1
    results: list[ExecutionResult | None] = [None] * len(programs)

    def one(i: int) -> None:
        results[i] = run_program(programs[i], config)
        if on_result is not None:
            on_result(i, results[i])

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for future in [pool.submit(one, i) for i in range(len(programs))]:
            future.result()  # re-raises a SandboxError from any worker
    finally:  # on an error, drop the programs not started yet instead of running them all
        pool.shutdown(wait=True, cancel_futures=True)
    return results  # type: ignore[return-value]


def isolation_report(config: SandboxConfig = SandboxConfig()) -> dict:
    """What isolation the sandbox achieves on this machine (runs one trivial program)."""
    import subprocess

    request = _request("pass", config, report=True)
    out = subprocess.run(
        [sys.executable, "-I", _RUNNER_PATH], input=request, capture_output=True, check=True,
        timeout=config.timeout_s + 30, start_new_session=True, env=_runner_env(),
    ).stdout
    return json.loads(out.decode().strip().splitlines()[-1])["isolation"]


def _runner_env() -> dict[str, str]:
    """Nothing of the harness's environment but where to find programs and temporary space."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


def _request(program: str, config: SandboxConfig, report: bool = False) -> bytes:
    settings = dict(asdict(config), cpu_s=config.cpu_s)
    return json.dumps({"program": program, "config": settings, "report": report}).encode()


def _result_text(report: dict) -> str:
    if report["status"] in ("passed", "timed out"):
        return report["status"]
    return f"failed: {report['detail']}"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_status(returncode: int | None) -> str:
    if returncode is None or returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"killed by signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


# ----------------------------------------------------------------------------------------------
# Runner side: everything below runs in ``python -I execution.py`` (A) and its children (B, C).
# ----------------------------------------------------------------------------------------------


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> bool:
    try:
        return _libc().prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def _unshare(flags: int) -> bool:
    try:
        return _libc().unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _isolate(config: dict) -> dict:
    """Enter new namespaces in A (children inherit them): PID always tried, network if asked."""
    is_root = os.geteuid() == 0
    want = _CLONE_NEWPID | (_CLONE_NEWNET if config["isolate_network"] else 0)
    entered = 0
    if is_root:
        entered = want if _unshare(want) else (_CLONE_NEWPID if _unshare(_CLONE_NEWPID) else 0)
    else:
        entered = want if _enter_user_namespace(want) else 0
    return {
        "pid_namespace": bool(entered & _CLONE_NEWPID),
        "network_namespace": bool(entered & _CLONE_NEWNET),
    }


def _enter_user_namespace(flags: int) -> bool:
    """Unprivileged users can often create namespaces inside a new user namespace; the user keeps
    its own uid there (mapped to itself), so it gains no privilege outside. Tried first in a
    throw-away child: a user namespace whose uid map cannot be written would leave us unmapped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _enter_user_namespace_here(flags) else 1)
    if os.waitpid(pid, 0)[1] != 0:
        return False
    return _enter_user_namespace_here(flags)


def _enter_user_namespace_here(flags: int) -> bool:
    uid, gid = os.geteuid(), os.getegid()
    if not _unshare(0x10000000 | flags):  # CLONE_NEWUSER
        return False
    try:
        for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{path}", "w") as f:
                f.write(text)
    except OSError:
        return False
    return True


def _pick_uid(config: dict) -> int | None:
    """The uid C runs as: None keeps ours (not root, or privileges not dropped)."""
    if os.geteuid() != 0 or not config["drop_privileges"]:
        return None
    for uid in (config["uid_base"] + os.getpid(), NOBODY_UID):
        pid = os.fork()  # try the switch in a throw-away child: a uid outside the map fails
        if pid == 0:
            try:
                os.setgid(uid)
                os.setuid(uid)
                os._exit(0)
            except BaseException:
                os._exit(1)
        if os.waitpid(pid, 0)[1] == 0:
            return uid
    raise OSError("running as root but cannot switch to an unprivileged uid")


def _make_workdir(uid: int | None) -> str:
    """A fresh directory the code owns, under a parent every uid can traverse."""
    import tempfile

    parents = [tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"]
    for parent in parents:
        if uid is None or _world_traversable(parent):
            path = tempfile.mkdtemp(prefix="megafim-exec-", dir=parent)
            if uid is not None:
                os.chown(path, uid, uid)
            return path
    raise OSError(f"no world-traversable temporary directory among {parents}")


def _world_traversable(path: str) -> bool:
    path = os.path.realpath(path)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        if path == os.path.dirname(path):
            return True
        path = os.path.dirname(path)


def _keep_sys_path_readable() -> None:
    """Let the unprivileged uid import from a Python installed under a private directory (e.g.
    pyenv in /root, mode 0700): open each such sys.path directory while still root and replace it
    with /proc/self/fd/N, a link that resolves without checking the private ancestors."""
    moved = {}
    for i, entry in enumerate(sys.path):
        if os.path.isdir(entry) and not (_world_traversable(entry) and _other_readable(entry)):
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)  # inherited by the code's forks too
            moved[entry.rstrip("/") + "/"] = sys.path[i] = f"/proc/self/fd/{fd}/"
    # Packages imported already (encodings, ...) find their submodules through __path__.
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            for j, path in enumerate(paths):
                for old, new in moved.items():
                    if path.startswith(old):
                        paths[j] = new + path[len(old):]
    sys.path_importer_cache.clear()


def _other_readable(path: str) -> bool:
    return bool(os.stat(path).st_mode & 0o004)


def _set_limits(config: dict, uid: int | None) -> None:
    import resource

    mib = 1024 * 1024
    nproc = config["max_procs"]
    if uid is None:  # the limit counts every process of our uid, not only the sandbox's
        nproc += _count_processes_of(os.getuid())
    limits = [
        (resource.RLIMIT_AS, config["memory_mb"] * mib),
        (resource.RLIMIT_FSIZE, config["max_file_mb"] * mib),
        (resource.RLIMIT_NPROC, nproc),
        (resource.RLIMIT_NOFILE, config["max_open_files"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in limits:  # soft == hard, so the code cannot raise them again
        resource.setrlimit(which, (value, value))
    # Soft limit: SIGXCPU (fatal); hard limit one second later: SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1))


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def _children() -> list[int]:
    """Direct children of this process (orphans re-parented to a subreaper included)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _kill_children() -> None:
    """SIGKILL and reap every child until none is left (new orphans keep arriving while a fork
    bomb dies, which RLIMIT_NPROC keeps finite)."""
    while True:
        kids = _children()
        for kid in kids:
            try:
                os.kill(kid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            pid, _ = os.waitpid(-1, 0 if kids else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0 and not kids:
            return


def _code_process(program: str, config: dict, result_fd: int, workdir: str, uid: int | None):
    """C: drop everything, run the program, report on the pipe. Never returns."""
    write, exit_, getpid, dumps = os.write, os._exit, os.getpid, json.dumps  # the code may patch os
    try:
        os.setsid()  # own session and process group: kill(0, ...) cannot reach the runner
        os.chdir(workdir)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, result_fd)
        os.closerange(result_fd + 1, 65536)
        if uid is not None:
            _keep_sys_path_readable()
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            _prctl(_PR_SET_DUMPABLE, 1)  # a uid change clears it, which hides /proc/self/fd
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: a credential change clears it
        _set_limits(config, uid)
        os.environ.clear()
        os.environ.update(PATH="/usr/bin:/bin", HOME=workdir, TMPDIR=workdir, LC_ALL="C.UTF-8")
        me = getpid()
    except BaseException as exc:
        write(result_fd, (dumps({"status": "error", "detail": repr(exc)}) + "\n").encode())
        exit_(1)
    try:
        exec(compile(program, "<generated>", "exec"), {"__name__": "__sandbox__"})
        report = {"status": "passed"}
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are failures too
        report = {"status": "failed", "detail": type(exc).__name__}
    if getpid() == me:  # a child the code forked runs to here too: only C reports
        write(result_fd, (dumps(report) + "\n").encode())
    exit_(0)


def _reaper(program: str, config: dict, result_fd: int, workdir: str, uid: int | None,
            in_pid_namespace: bool):
    """B: start C, wait for it, report how it ended if it did not say, kill what is left."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # A dies -> B dies -> (PID namespace) all die
    if not in_pid_namespace:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans come to B, so B can kill them
    code_pid = os.fork()
    if code_pid == 0:
        _code_process(program, config, result_fd, workdir, uid)
    while True:  # PID 1 (or a subreaper) also reaps the orphans
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == code_pid:
            break
    if os.WIFSIGNALED(status):
        try:
            name = signal.Signals(os.WTERMSIG(status)).name
        except ValueError:  # real-time signals have no name
            name = str(os.WTERMSIG(status))
        detail = f"killed by signal {name}"
    else:
        detail = f"exited before the tests finished (code {os.WEXITSTATUS(status)})"
    # If C reported, its line is already in the pipe ahead of this one; A reads the first line.
    os.write(result_fd, (json.dumps({"status": "failed", "detail": detail}) + "\n").encode())
    _kill_children()
    os._exit(0)


def _supervise(read_fd: int, timeout_s: float) -> dict:
    """A: wait for the first result line, the reaper's end, or the deadline."""
    deadline = time.monotonic() + timeout_s
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"status": "timed out"}
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:  # B always reports before it ends: only the code can have killed it
            return {"status": "failed", "detail": "sandbox reaper killed before it reported"}
        buffer += chunk
    try:
        return json.loads(buffer.split(b"\n", 1)[0])
    except ValueError:  # only code writing into the result pipe can garble it
        return {"status": "failed", "detail": "garbled result"}


def _runner_main() -> None:
    """A: read the request on stdin, run it, print one JSON line."""
    import shutil

    request = json.loads(sys.stdin.buffer.read())
    config = request["config"]
    try:
        uid = _pick_uid(config)
        workdir = _make_workdir(uid)
    except OSError as exc:
        print(json.dumps({"status": "error", "detail": repr(exc)}), flush=True)
        return
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    isolation = _isolate(config)
    isolation["uid"] = uid if uid is not None else os.getuid()
    read_fd, write_fd = os.pipe()
    reaper_pid = os.fork()
    if reaper_pid == 0:
        os.close(read_fd)
        _reaper(request["program"], config, write_fd, workdir, uid, isolation["pid_namespace"])
    os.close(write_fd)
    try:
        report = _supervise(read_fd, config["timeout_s"])
    finally:
        try:
            os.kill(reaper_pid, signal.SIGKILL)  # as PID 1 of its namespace, it takes all along
        except ProcessLookupError:
            pass
        _kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    if request.get("report"):
        report["isolation"] = isolation
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    _runner_main()
