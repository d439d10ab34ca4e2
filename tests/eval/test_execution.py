"""The sandbox that runs generated code against a trusted test: verdicts are right, cannot be
forged from the code's process, and misbehaving code cannot break the harness or other results."""

import glob
import json
import shlex
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from megafim.eval.execution import (Check, SandboxConfig, isolation_notes, isolation_report,
                                    run_check, run_checks)

IS_ROOT = os.geteuid() == 0
QUICK = SandboxConfig(timeout_s=10.0)  # generous: the CI machine is shared and busy
SQUARE_TEST = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
GOOD = "def f(x):\n    return x * x\n"


def _code(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def _check(code: str, test: str = SQUARE_TEST, context: str = "") -> Check:
    return Check(code=code, entry_point="f", test=test, context=context)


def _run(code: str, config: SandboxConfig = QUICK, **kw) -> str:
    return run_check(_check(code, **kw), config).result


def _uids_alive(lo: int, hi: int) -> list[int]:
    """uids in [lo, hi) that own a live (non-zombie) process."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        uid = int(fields["Uid"].split()[0])
        if lo <= uid < hi and not fields["State"].strip().startswith("Z"):
            alive.append(uid)
    return alive


def test_pass_and_fail_are_reported_with_the_exception_type():
    codes = [
        GOOD,
        "def f(x):\n    return x * 3\n",               # right for 3, wrong for -2
        "def f(:\n",
        "def f(x):\n    raise KeyError('x')\n",
        "import math, collections, hashlib\ndef f(x):\n    return math.prod([x, x])\n",
        "def g(x):\n    return x * x\n",                 # no entry point
        "def f(x):\n    return [x * x]\n",               # a list is not 9
    ]
    results = run_checks([_check(c) for c in codes], QUICK, workers=2)
    assert [r.result for r in results] == [
        "passed", "failed: AssertionError", "failed: SyntaxError", "failed: KeyError", "passed",
        "failed: NameError", "failed: AssertionError"]
    assert [r.passed for r in results] == [True, False, False, False, True, False, False]


def test_values_cross_with_their_exact_types():
    test = _code("""
        def check(candidate):
            value = (1, 2.5, float('inf'), 'é', b'\\x00', None, True, [1, (2,)], {3: {4}},
                     frozenset({5}), 1j, 10 ** 40)
            out = candidate(value, k={'a': [1]})
            assert out == [value, {'a': [1]}]
            assert type(out[0][7][1]) is tuple and type(out[0][0]) is int and out[0][6] is True
    """)
    assert _run("def f(v, k):\n    return [v, k]\n", test=test) == "passed"


def test_the_test_uses_the_context_and_calls_the_code_by_name():
    # HumanEval/32 and /33 style: the test calls a helper from the prompt and the entry point
    # by its global name; both must work, and the code's own helper must not be the judge.
    context = "def helper(x):\n    return x + 1\n"
    test = "def check(candidate):\n    assert f(2) == helper(3)\n"
    assert _run("def helper(x):\n    return 0\ndef f(x):\n    return x * 2\n",
                test=test, context=context) == "passed"
    assert _run("def helper(x):\n    return 0\ndef f(x):\n    return 0\n",
                test=test, context=context) == "failed: AssertionError"


def test_hanging_program_times_out():
    assert _run("while True:\n    pass\n", SandboxConfig(timeout_s=1.0)) == "timed out"
    assert _run("def f(x):\n    import time\n    time.sleep(60)\n",
                SandboxConfig(timeout_s=1.0)) == "timed out"


# The attacks of issue 15 and others like them: each must fail its sample. Before the test ran
# apart from the code, the first two scored "passed".
FORGERIES = {
    "patch json.dumps, then fail": _code("""
        import json
        json.dumps.__code__ = (lambda *a, **k: '{"status": "passed"}').__code__
        assert False
    """),
    "write a pass to every descriptor": _code("""
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b'{"status": "passed"}\\n')
            except OSError:
                pass
        def f(x):
            return 0
    """),
    "os._exit(0)": "import os\nos._exit(0)\n",
    "os._exit(0) in the call": "def f(x):\n    import os\n    os._exit(0)\n",
    "SystemExit(0)": "raise SystemExit(0)\n",
    "SystemExit(0) in the call": "def f(x):\n    raise SystemExit(0)\n",
    "an int that equals everything": _code("""
        class Liar(int):
            def __eq__(self, other):
                return True
        def f(x):
            return Liar(0)
    """),
    "swallow the test's error through sys.excepthook": _code("""
        import sys
        sys.excepthook = lambda *a: None
        def f(x):
            return 0
    """),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_the_code_cannot_forge_a_pass(name):
    result = run_check(_check(FORGERIES[name]), QUICK)
    assert not result.passed and result.result.startswith("failed: "), result


def test_the_test_and_reference_are_not_in_the_code_process():
    # The expected value exists only in the test; the code searches for it in every Python
    # object and in its whole readable memory, and returns it if found.
    token = "TOKEN" + secrets.token_hex(8)
    test = f"def check(candidate):\n    assert candidate() == {token!r}\n"
    context = f"REFERENCE = {token!r}\n"
    code = _code("""
        import gc, re
        def _search():
            for obj in gc.get_objects():
                for text in (obj if isinstance(obj, (list, tuple)) else [obj]):
                    if isinstance(text, str):
                        m = re.search('TOKEN[0-9a-f]{16}', text)
                        if m:
                            return m.group(0)
            with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb') as mem:
                for line in maps:
                    span, perms = line.split()[:2]
                    if 'r' not in perms:
                        continue
                    lo, hi = (int(x, 16) for x in span.split('-'))
                    try:
                        mem.seek(lo)
                        m = re.search(rb'TOKEN[0-9a-f]{16}', mem.read(hi - lo))
                    except (OSError, OverflowError, ValueError):
                        continue
                    if m:
                        return m.group(0).decode()
            return None
        def f():
            return _search()
    """)
    assert _run(code, SandboxConfig(timeout_s=30.0), test=test, context=context) == \
        "failed: AssertionError"
    # The search works: given the token in its own text, the same code finds it and passes.
    planted = code + f"PLANTED = 'x' + {token!r}[0:]\n"
    assert _run(planted, SandboxConfig(timeout_s=30.0), test=test, context=context) == "passed"


# Each misbehaving program next to the result it must get. None of them may change the results of
# the good programs running beside them.
HOSTILE = {
    "exit()": ("exit()\n", "failed: SystemExit"),
    "sys.exit(0)": ("import sys\nsys.exit(0)\n", "failed: SystemExit"),
    "os._exit(0)": ("import os\nos._exit(0)\n",
                    "failed: exited before the tests finished (code 0)"),
    "kill self": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
                  "failed: killed by signal SIGKILL"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", "failed: BlockingIOError"),
    "input()": ("input()\n", "failed: EOFError"),
    "huge allocation": ("x = bytearray(8 << 30)\n", "failed: MemoryError"),
    "huge file": ("open('big', 'w').write('a' * (64 << 20))\n", "failed: OSError"),
    "forked child serves, parent fails": (
        "import os, time\nif os.fork() == 0:\n    def f(x):\n        return x * x\nelse:\n"
        "    time.sleep(0.3)\n    assert False\n", "failed: AssertionError"),
}


def test_hostile_programs_do_not_disturb_the_others():
    good = _code("""
        import os
        open('scratch.txt', 'w').write('x' * 1000)   # its own working directory
        assert os.listdir('.') == ['scratch.txt']      # fresh: nobody else's files
        print('y' * (4 << 20))                         # megabytes of output go nowhere
        def f(x):
            return x * x
    """)
    checks, expected = [], []
    for code, result in HOSTILE.values():
        checks += [_check(code), _check(good)]
        expected += [result, "passed"]
    results = run_checks(checks, QUICK, workers=4)
    assert [r.result for r in results] == expected


def test_killing_the_parent_or_everyone_only_fails_that_program():
    isolation = isolation_report(QUICK)
    if not isolation["pid_namespace"] and isolation["uid"] == os.getuid():
        # Neither a PID namespace nor another uid: kill(-1, 9) would reach this very test run.
        pytest.skip("no PID namespace and no uid switch on this machine")
    codes = [
        "import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(5)\n", GOOD,
        "import os\nos.kill(-1, 9)\nimport time\ntime.sleep(5)\n", GOOD,
        "import os\nos.killpg(0, 9)\n", GOOD,
    ]
    results = run_checks([_check(c) for c in codes], SandboxConfig(timeout_s=3.0), workers=3)
    assert [r.passed for r in results] == [False, True, False, True, False, True]


def test_leftover_processes_are_killed():
    # A daemon that escapes with setsid and a double fork, then sleeps: the check itself passes,
    # and nothing of it may survive the run. A private uid range identifies its processes.
    config = SandboxConfig(timeout_s=10.0, uid_base=10_000_000)
    code = _code("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(120)
            os._exit(0)
        time.sleep(0.2)
    """) + GOOD
    assert _run(code, config) == "passed"
    if IS_ROOT:
        assert _uids_alive(10_000_000, 20_000_000) == []


def test_environment_and_working_directory_are_fresh(monkeypatch):
    monkeypatch.setenv("MEGAFIM_TEST_SECRET", "s3cret")
    code = _code(f"""
        import os
        assert 'MEGAFIM_TEST_SECRET' not in os.environ
        assert os.getcwd() != {str(os.getcwd())!r}
        assert os.listdir('.') == []
    """) + GOOD
    assert _run(code) == "passed"


def test_written_files_are_removed_and_their_total_size_is_capped():
    if not isolation_report(QUICK)["private_tmp"]:
        pytest.skip("this OS does not let the harness mount a private tmpfs")
    token = secrets.token_hex(8)
    code = _code(f"""
        open('work-{token}', 'w').write('x')
        open('/tmp/megafim-marker-{token}', 'w').write('x')
    """) + GOOD
    assert _run(code) == "passed"
    assert not os.path.exists(f"/tmp/megafim-marker-{token}")
    assert not glob.glob(f"{tempfile.gettempdir()}/megafim-exec-*/work-{token}")
    # Four files of 3 MiB, each under the per-file limit, exceed a total of 8 MiB.
    many = "for i in range(4):\n    open(f'/tmp/f{i}', 'w').write('a' * (3 << 20))\n" + GOOD
    assert _run(many, SandboxConfig(timeout_s=10.0, max_disk_mb=8)) == "failed: OSError"
    assert _run(many, SandboxConfig(timeout_s=10.0, max_disk_mb=16)) == "passed"
    # Without the private mounts the /tmp file outlives the check: the assertion above can fail.
    try:
        assert _run(code, SandboxConfig(timeout_s=10.0, private_mounts=False)) == "passed"
        assert os.path.exists(f"/tmp/megafim-marker-{token}")
    finally:
        if os.path.exists(f"/tmp/megafim-marker-{token}"):
            os.unlink(f"/tmp/megafim-marker-{token}")


def test_other_processes_command_lines_are_hidden():
    if not isolation_report(QUICK)["private_proc"]:
        pytest.skip("this OS does not let the harness mount a private /proc")
    token = "megafim-secret-" + secrets.token_hex(8)
    visible = _code(f"""
        import os
        def _seen():
            for pid in os.listdir('/proc'):
                try:
                    if pid.isdigit() and {token!r} in open(f'/proc/{{pid}}/cmdline').read():
                        return True
                except OSError:
                    pass
            return False
        def f(x):
            return x * x if _seen() else 0
    """)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token])
    try:
        assert _run(visible) == "failed: AssertionError"
        # Without the private /proc the code sees the command line: the check above can fail.
        assert _run(visible, SandboxConfig(timeout_s=10.0, private_mounts=False)) == "passed"
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(not IS_ROOT, reason="privileges are dropped only when the harness is root")
def test_code_runs_unprivileged_and_cannot_write_outside():
    # Outside the folders the sandbox replaces with its tmpfs; a checkout may itself live under /tmp.
    here = os.path.dirname(os.path.realpath(__file__))
    replaced = {"/tmp", "/var/tmp", "/dev/shm", os.path.realpath(tempfile.gettempdir())}
    outside = os.path.expanduser("~") if any(os.path.commonpath([here, r]) == r for r in replaced) else here
    folder = tempfile.mkdtemp(prefix=".sandbox-test-", dir=outside)
    os.chmod(folder, 0o755)
    try:
        _write_outside(os.path.join(folder, "pwned"))
    finally:
        shutil.rmtree(folder)


def _write_outside(target: str) -> None:
    code = f"open({str(target)!r}, 'w').write('x')\n" + GOOD
    assert _run(code) == "failed: PermissionError"
    assert not os.path.exists(target)
    assert _run("import os\nassert os.getuid() != 0\n" + GOOD) == "passed"
    # The same write works without the privilege drop: the check above can fail.
    assert _run(code, SandboxConfig(timeout_s=10.0, drop_privileges=False)) == "passed"
    assert os.path.exists(target)


def test_network_is_unreachable_when_isolated():
    if not isolation_report(QUICK)["network_namespace"]:
        pytest.skip("this OS does not let the harness create a network namespace")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + GOOD
        assert _run(code) == "failed: OSError"
        # Without the namespace the same connection succeeds: the check above can fail.
        assert _run(code, SandboxConfig(timeout_s=10.0, isolate_network=False)) == "passed"


def test_isolation_notes_name_what_is_missing():
    full = {"pid_namespace": True, "network_namespace": True, "private_proc": True,
            "private_tmp": True}
    assert isolation_notes(full) == []
    notes = isolation_notes(dict(full, private_proc=False))
    assert len(notes) == 1 and "command lines" in notes[0]


def test_config_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxConfig(memory_mb=0)
    with pytest.raises(ValueError, match="max_disk_mb"):
        SandboxConfig(max_disk_mb=0)
    with pytest.raises(ValueError, match="max_open_files"):
        SandboxConfig(max_open_files=4)
    with pytest.raises(ValueError, match="workers"):
        run_checks([_check(GOOD)], QUICK, workers=-1)


def test_memory_limit_is_the_configured_one():
    code = "x = bytearray(300 << 20)\nx[-1] = 1\n" + GOOD
    assert _run(code, SandboxConfig(timeout_s=10.0, memory_mb=200)) == "failed: MemoryError"
    assert _run(code, SandboxConfig(timeout_s=10.0, memory_mb=1024)) == "passed"


def _as_nobody(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", " ".join(args)],
                          capture_output=True, text=True, timeout=120, cwd="/")


@pytest.mark.skipif(not IS_ROOT or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to become nobody) and a system Python nobody can run")
def test_a_harness_that_is_not_root_gets_the_same_protection():
    # The harness side is standard library only, so a system Python runs it as nobody.
    if _as_nobody(["unshare", "-U", "true"]).returncode != 0:
        pytest.skip("this kernel gives unprivileged users no user namespaces")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = _code(f"""
        import json, sys
        sys.path.insert(0, {repo!r})
        from megafim.eval.execution import Check, SandboxConfig, isolation_report, run_check
        config = SandboxConfig(timeout_s=10.0)
        forged = {FORGERIES["write a pass to every descriptor"]!r}
        print(json.dumps([isolation_report(config)] + [
            run_check(Check(code, "f", {SQUARE_TEST!r}), config).result
            for code in ({GOOD!r}, forged)]))
    """)
    out = _as_nobody(["/usr/bin/python3", "-c", shlex.quote(script)])
    assert out.returncode == 0, out.stderr
    isolation, good, forged = json.loads(out.stdout)
    assert isolation["uid"] == 65534
    assert all(isolation[k] for k in ("pid_namespace", "network_namespace", "private_proc",
                                      "private_tmp")), isolation
    assert good == "passed" and forged.startswith("failed: ")
