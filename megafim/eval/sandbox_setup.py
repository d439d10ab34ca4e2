"""Kernel set-up for the sandbox runner (``sandbox_runner.py``): namespaces, uids, mounts,
limits, process clean-up. Standard library only, like the runner, which imports it by path."""

from __future__ import annotations

import os
import signal
import sys

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
