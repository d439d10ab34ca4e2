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

# The set-up helpers sit beside this file; -I keeps the script's folder off sys.path, so it is
# put there for this one import and taken off before any code runs.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sandbox_setup import (_PR_SET_CHILD_SUBREAPER, _PR_SET_DUMPABLE,  # noqa: E402
                           _PR_SET_PDEATHSIG, _close_all_but, _describe_exit, _drop_to,
                           _enter_workdir, _isolate, _kill_children,
                           _make_workdir, _pick_uids, _prctl,
                           _private_mounts, _set_limits)
del sys.path[0]

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
    # Nobody of our uid may read our memory or descriptors. Only now: a non-dumpable process
    # cannot write its own uid_map, which entering a user namespace needs. C does not exist yet.
    _prctl(_PR_SET_DUMPABLE, 0)
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
