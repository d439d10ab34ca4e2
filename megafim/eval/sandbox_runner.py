"""The sandbox runner: ``python -I sandbox_runner.py`` runs one check (docs/evaluation.md).

Standard library only: it runs as a script in a bare ``python -I``. Four processes per check:

    A  runner: reads the request, owns the verdict, kills everything at the end
    T  test process (forked by A before any namespace): runs the trusted test ``check(candidate)``
       where ``candidate`` is a proxy that sends plain-data arguments to C and receives plain data
    B  reaper: PID 1 of a new PID namespace where permitted; private /proc and capped /tmp
    C  code process (forked by B): runs the untrusted code, then serves calls of its entry point

The verdict is written only by T, on a pipe only A and T hold. C never holds it, never sees the
test or the reference program (A reads them only in T, after the fork that leads to C), and can
only answer calls with plain values; so nothing C does can produce ``passed`` except answering
every call of the test with values that satisfy the test's assertions, which T evaluates.

Request on stdin: one line with the byte length L of a JSON object {code, entry_point, config,
report}, those L bytes, then a JSON object {test, context} up to EOF (read by T only).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

NOBODY_UID = 65534
# Linux clone flags (sched.h), prctl options (prctl.h) and mount flags (mount.h), through ctypes.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_TEST_UID_OFFSET = 1 << 22  # T's uid = C's uid + this (pids are below 2**22)
_MAX_MESSAGE = 64 << 20  # longest line one process accepts from another
_MAX_DEPTH = 200  # deepest nesting of a sent value


# ----------------------------------------------------------------------------------------------
# Plain values between T and C: JSON, with tags for what JSON cannot tell apart. Only exact
# builtin types cross, so an object with a forged ``__eq__`` cannot reach the test's assertions.
# ----------------------------------------------------------------------------------------------


class Unsendable(TypeError):
    """A value of a type that does not cross between the processes."""


def encode(value, depth: int = 0):
    if depth > _MAX_DEPTH:
        raise Unsendable("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    tags = {tuple: "t", set: "s", frozenset: "f"}
    if kind in tags:
        return {tags[kind]: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    raise Unsendable(kind.__name__)


def decode(data, depth: int = 0):
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v, depth + 1) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise ValueError("not an encoded value")
    (tag, body), = data.items()
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if type(body) is not list:
        raise ValueError("not an encoded value")
    items = [decode(v, depth + 1) for v in body]
    if tag == "t":
        return tuple(items)
    if tag in ("s", "f"):
        return (set if tag == "s" else frozenset)(items)
    if tag == "d" and all(type(p) is list and len(p) == 2 for p in items):
        return {k: v for k, v in items}
    raise ValueError(f"unknown tag {tag!r}")


def _send(fd: int, obj) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


class _Lines:
    """Reads newline-terminated JSON messages from a descriptor, at most _MAX_MESSAGE each."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def read(self):
        """The next message, or None at end of file."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_MESSAGE:
                raise ValueError("message too long")
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


# ----------------------------------------------------------------------------------------------
# Kernel helpers
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


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> bool:
    try:
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        return _libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0
    except (OSError, AttributeError):
        return False


def _drop_capabilities() -> None:
    """Clear every capability (a process in a new user namespace holds all of them there)."""
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    try:
        _libc().capset(header, data)
    except (OSError, AttributeError):
        pass


def _close_all_but(keep: set[int]) -> None:
    last = 2
    for fd in sorted(keep | {65536}):
        if fd > last + 1:
            os.closerange(last + 1, fd)
        last = fd


def _children() -> list[int]:
    """Direct children of this process (orphans re-parented to a subreaper included)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _kill_children() -> None:
    """SIGKILL and reap every child until none is left (a dying fork bomb keeps re-parenting
    orphans to us for a while; RLIMIT_NPROC keeps that finite)."""
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


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            name = signal.Signals(os.WTERMSIG(status)).name
        except ValueError:  # real-time signals have no name
            name = str(os.WTERMSIG(status))
        return f"killed by signal {name}"
    return f"exited before the tests finished (code {os.WEXITSTATUS(status)})"


# ----------------------------------------------------------------------------------------------
# Isolation set-up (A and B)
# ----------------------------------------------------------------------------------------------


def _isolate(config: dict) -> dict:
    """Enter new namespaces in A (B and C inherit them): PID always tried, network if asked."""
    want = _CLONE_NEWPID | (_CLONE_NEWNET if config["isolate_network"] else 0)
    if os.geteuid() == 0:
        entered = want if _unshare(want) else (_CLONE_NEWPID if _unshare(_CLONE_NEWPID) else 0)
    else:
        entered = want if _enter_user_namespace(want) else 0
    return {"pid_namespace": bool(entered & _CLONE_NEWPID),
            "network_namespace": bool(entered & _CLONE_NEWNET)}


def _enter_user_namespace(flags: int) -> bool:
    """Unprivileged users can often create namespaces inside a new user namespace that maps their
    uid to itself (no privilege outside). Tried first in a throw-away child: a namespace whose uid
    map cannot be written would leave us unmapped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _enter_user_namespace_here(flags) else 1)
    if os.waitpid(pid, 0)[1] != 0:
        return False
    return _enter_user_namespace_here(flags)


def _enter_user_namespace_here(flags: int) -> bool:
    uid, gid = os.geteuid(), os.getegid()
    if not _unshare(_CLONE_NEWUSER | flags):
        return False
    try:
        for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{path}", "w") as f:
                f.write(text)
    except OSError:
        return False
    return True


def _can_switch_to(uid: int) -> bool:
    pid = os.fork()  # try the switch in a throw-away child: a uid outside the map fails
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def _pick_uids(config: dict) -> tuple[int | None, int | None]:
    """(C's uid, T's uid): None keeps ours (not root, or privileges not dropped)."""
    if os.geteuid() != 0 or not config["drop_privileges"]:
        return None, None
    own = config["uid_base"] + os.getpid()
    if _can_switch_to(own) and _can_switch_to(own + _TEST_UID_OFFSET):
        return own, own + _TEST_UID_OFFSET
    if _can_switch_to(NOBODY_UID):
        return NOBODY_UID, NOBODY_UID  # T is then protected by being non-dumpable only
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


def _private_mounts(config: dict, uid: int | None, in_pid_namespace: bool) -> tuple[str | None,
                                                                                     dict]:
    """B: a private mount namespace with one capped tmpfs on /tmp, /var/tmp and /dev/shm (gone
    when the namespace ends) and, in a PID namespace, a /proc that shows only this sandbox.
    Returns (C's working directory on the tmpfs or None, what was achieved)."""
    done = {"private_tmp": False, "private_proc": False}
    if not config["private_mounts"] or not _unshare(_CLONE_NEWNS):
        return None, done
    if not _mount("none", "/", None, _MS_REC | _MS_PRIVATE, None):
        return None, done
    options = f"size={config['max_disk_mb']}m,nr_inodes=4096,mode=1777"
    if _mount("megafim-tmp", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, options):
        for other in ("/var/tmp", "/dev/shm"):  # binds share the one size cap
            if os.path.isdir(other):
                _mount("/tmp", other, None, _MS_BIND, None)
        work = "/tmp/work"
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
        done["private_tmp"] = True
    if in_pid_namespace:
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        done["private_proc"] = (_mount("proc", "/proc", "proc", flags, "hidepid=2")
                                or _mount("proc", "/proc", "proc", flags, None))
    return ("/tmp/work" if done["private_tmp"] else None), done


def _keep_sys_path_readable() -> None:
    """Let an unprivileged uid import from a Python installed under a private directory (e.g.
    pyenv in /root, mode 0700): open each such sys.path directory while still root and replace it
    with /proc/self/fd/N, a link that resolves without checking the private ancestors."""
    moved = {}
    for i, entry in enumerate(sys.path):
        if os.path.isdir(entry) and not (_world_traversable(entry)
                                         and os.stat(entry).st_mode & 0o004):
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)  # inherited by the code's forks too
            moved[entry.rstrip("/") + "/"] = sys.path[i] = f"/proc/self/fd/{fd}/"
    for module in list(sys.modules.values()):  # packages imported already find submodules here
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            for j, path in enumerate(paths):
                for old, new in moved.items():
                    if path.startswith(old):
                        paths[j] = new + path[len(old):]
    sys.path_importer_cache.clear()


def _drop_to(uid: int | None) -> None:
    if uid is not None:
        _keep_sys_path_readable()
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        _prctl(_PR_SET_DUMPABLE, 1)  # a uid change clears it, which hides /proc/self/fd
    else:
        _drop_capabilities()
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary can give privileges back
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: a credential change clears it


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


def _enter_workdir(workdir: str) -> None:
    os.setsid()  # own session and process group: kill(0, ...) cannot reach the runner
    os.chdir(workdir)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.environ.clear()
    os.environ.update(PATH="/usr/bin:/bin", HOME=workdir, TMPDIR=workdir, LC_ALL="C.UTF-8")


# ----------------------------------------------------------------------------------------------
# C: the code process. Nothing here is trusted after ``exec``: the code may have changed it all.
# ----------------------------------------------------------------------------------------------


def _code_process(code: str, entry_point: str, config: dict, calls: int, replies: int,
                  workdir: str, uid: int | None):
    """Run the code, then answer calls of its entry point with plain values. Never returns."""
    exit_, getpid = os._exit, os.getpid
    try:
        _close_all_but({calls, replies})
        _enter_workdir(workdir)
        _drop_to(uid)
        _set_limits(config, uid)
        me = getpid()
    except BaseException:
        exit_(3)  # B reports the exit; T fails the sample
    reader, namespace = _Lines(calls), {"__name__": "__sandbox__"}
    try:
        exec(compile(code, "<generated>", "exec"), namespace)
        function = namespace.get(entry_point)
        answer = {"ready": True} if callable(function) else {"raise": "NameError"}
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are failures too
        function, answer = None, {"raise": type(exc).__name__}
    while True:
        if getpid() != me:  # a child the code forked runs to here too: only C answers
            exit_(0)
        _send(replies, answer)
        if function is None:
            exit_(0)
        request = reader.read()
        if request is None:
            exit_(0)
        try:
            result = function(*decode(request["args"]), **decode(request["kwargs"]))
            try:
                answer = {"return": encode(result)}
            except Unsendable as exc:
                answer = {"unsendable": str(exc)}
        except BaseException as exc:
            answer = {"raise": type(exc).__name__}


# ----------------------------------------------------------------------------------------------
# T: the test process. Runs only trusted text (the test and the reference program).
# ----------------------------------------------------------------------------------------------


class _CodeEnded(Exception):
    """The code process closed its end: it exited, was killed, or closed the pipe itself."""


class _Failed(Exception):
    """The sample fails with this reason (an exception the code raised, a garbled reply...)."""


def _remote_name(name) -> str:
    return name if isinstance(name, str) and name.isidentifier() and len(name) < 80 else \
        "Exception"


def _proxy(calls: int, reader: _Lines):
    def candidate(*args, **kwargs):
        try:
            request = {"args": encode(list(args)), "kwargs": encode(kwargs)}
        except Unsendable as exc:
            raise RuntimeError(f"sandbox cannot send an argument of type {exc}") from None
        try:
            _send(calls, request)
        except BrokenPipeError:
            raise _CodeEnded() from None
        try:
            answer = reader.read()
        except (ValueError, UnicodeError, RecursionError):
            raise _Failed("garbled reply from the code") from None
        if answer is None:
            raise _CodeEnded()
        if type(answer) is dict and len(answer) == 1:
            (kind, body), = answer.items()
            if kind == "return":
                try:
                    return decode(body)
                except (ValueError, TypeError, RecursionError):
                    raise _Failed("garbled reply from the code") from None
            if kind == "raise":
                raise _Failed(_remote_name(body))
            if kind == "unsendable":
                raise _Failed("returned a value of a type the test cannot receive")
        raise _Failed("garbled reply from the code")

    return candidate


def _run_test(entry_point: str, calls: int, replies: int) -> dict:
    """The verdict. Set-up errors (trusted text that does not run) are ``error``, not failures."""
    spec = json.loads(sys.stdin.buffer.read())
    namespace = {"__name__": "__test__"}
    try:
        exec(compile(spec["context"], "<context>", "exec"), namespace)
        exec(compile(spec["test"], "<test>", "exec"), namespace)
        check = namespace["check"]
    except BaseException as exc:
        return {"status": "error", "detail": f"the test does not run: {exc!r}"}
    reader = _Lines(replies)
    candidate = _proxy(calls, reader)
    namespace[entry_point] = candidate  # a test that names the function gets the code's too
    try:
        hello = reader.read()
        if hello is None:
            raise _CodeEnded()
        if hello != {"ready": True}:
            raised = hello.get("raise") if type(hello) is dict and len(hello) == 1 else None
            raise _Failed(_remote_name(raised) if raised else "garbled reply from the code")
        check(candidate)
    except _CodeEnded:
        return {"status": "ended"}
    except _Failed as exc:
        return {"status": "failed", "detail": str(exc)}
    except (ValueError, UnicodeError) as exc:
        return {"status": "failed", "detail": type(exc).__name__}
    except BaseException as exc:
        return {"status": "failed", "detail": type(exc).__name__}
    return {"status": "passed"}


def _test_process(entry_point: str, config: dict, verdict: int, calls: int, replies: int,
                  uid: int | None):
    """T. Never returns."""
    try:
        _close_all_but({0, verdict, calls, replies})
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        _drop_to(uid)
        if uid is None:
            _prctl(_PR_SET_DUMPABLE, 0)  # same uid as C: no ptrace, no /proc/T/mem for it
        _set_limits(dict(config, max_procs=config["max_procs"] + 4), uid)
        report = _run_test(entry_point, calls, replies)
    except BaseException as exc:
        report = {"status": "error", "detail": f"test process set-up: {exc!r}"}
    try:
        _send(verdict, report)
    finally:
        os._exit(0)


# ----------------------------------------------------------------------------------------------
# B: the reaper
# ----------------------------------------------------------------------------------------------


def _reaper(code: str, entry_point: str, config: dict, fds: dict, workdir: str,
            uid: int | None, in_pid_namespace: bool):
    """B: private mounts, start C, say how C ended, kill what is left. Never returns."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # A dies -> B dies -> (PID namespace) all die
    if not in_pid_namespace:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans come to B, so B can kill them
    status = fds["status"]
    try:
        private_workdir, mounts = _private_mounts(config, uid, in_pid_namespace)
    except OSError:
        private_workdir, mounts = None, {"private_tmp": False, "private_proc": False}
    _send(status, {"mounts": mounts})
    code_pid = os.fork()
    if code_pid == 0:
        _code_process(code, entry_point, config, fds["calls"], fds["replies"],
                      private_workdir or workdir, uid)
    os.close(fds["calls"])
    os.close(fds["replies"])
    while True:  # PID 1 (or a subreaper) also reaps the orphans
        try:
            pid, exit_status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == code_pid:
            break
    _send(status, {"code_ended": _describe_exit(exit_status)})
    _kill_children()
    os._exit(0)


# ----------------------------------------------------------------------------------------------
# A: the runner
# ----------------------------------------------------------------------------------------------


def _read_head() -> dict:
    """The first part of the request, read exactly, so the rest (the test) stays in the pipe."""
    length = b""
    while not length.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            raise ValueError("truncated request")
        length += byte
    remaining, data = int(length), b""
    while remaining:
        chunk = os.read(0, remaining)
        if not chunk:
            raise ValueError("truncated request")
        data, remaining = data + chunk, remaining - len(chunk)
    return json.loads(data)


def _supervise(verdict_fd: int, status_fd: int, timeout_s: float) -> tuple[dict, dict]:
    """Wait for T's verdict (and, when the code ended first, B's word on how), or the deadline."""
    deadline = time.monotonic() + timeout_s
    readers = {verdict_fd: _Lines(verdict_fd), status_fd: _Lines(status_fd)}
    verdict, info, open_fds = None, {}, [verdict_fd, status_fd]
    while open_fds:
        if verdict is not None and (verdict["status"] != "ended" or "code_ended" in info):
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"status": "timed out"}, info
        ready, _, _ = select.select(open_fds, [], [], remaining)
        for fd in ready:
            message = readers[fd].read()  # one message at a time; both writers are trusted
            if message is None:
                open_fds.remove(fd)
            elif fd == verdict_fd:
                verdict = message
            else:
                info.update(message)
    if verdict is None:
        return {"status": "failed", "detail": "the test process ended without a verdict"}, info
    if verdict["status"] == "ended":
        return {"status": "failed",
                "detail": info.get("code_ended", "the code process closed its pipe")}, info
    return verdict, info


def _runner_main() -> None:
    """A: read the request, fork T and B, print one JSON line."""
    import shutil

    request = _read_head()
    config = request["config"]
    _prctl(_PR_SET_DUMPABLE, 0)  # nobody of our uid may read our memory or descriptors
    try:
        uid, test_uid = _pick_uids(config)
        workdir = _make_workdir(uid)
    except OSError as exc:
        print(json.dumps({"status": "error", "detail": repr(exc)}), flush=True)
        return
    verdict_r, verdict_w = os.pipe()
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    status_r, status_w = os.pipe()
    test_pid = os.fork()
    if test_pid == 0:
        _test_process(request["entry_point"], config, verdict_w, calls_w, replies_r, test_uid)
    for fd in (verdict_w, calls_w, replies_r):
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the test's text stays for T alone
    os.close(devnull)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    isolation = _isolate(config)
    isolation["uid"] = uid if uid is not None else os.getuid()
    reaper_pid = os.fork()
    if reaper_pid == 0:
        os.close(verdict_r)
        os.close(status_r)
        _reaper(request["code"], request["entry_point"], config,
                {"calls": calls_r, "replies": replies_w, "status": status_w}, workdir, uid,
                isolation["pid_namespace"])
    for fd in (calls_r, replies_w, status_w):
        os.close(fd)
    try:
        report, info = _supervise(verdict_r, status_r, config["timeout_s"])
    finally:
        for pid in (reaper_pid, test_pid):  # B, as PID 1 of its namespace, takes all along
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    if request.get("report"):
        report["isolation"] = dict(isolation, **info.get("mounts", {}))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    _runner_main()
