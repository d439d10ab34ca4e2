"""The sandbox that runs generated programs: results are right, and misbehaving code cannot break
the harness or other programs' results."""

import os
import socket
import textwrap

import pytest

from megafim.eval.execution import SandboxConfig, isolation_report, run_program, run_programs

IS_ROOT = os.geteuid() == 0
QUICK = SandboxConfig(timeout_s=10.0)  # generous: the CI machine is shared and busy


def _prog(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


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
    programs = [
        "assert sum(range(4)) == 6\n",
        "assert sum(range(4)) == 7\n",
        "def f(:\n",
        "raise KeyError('x')\n",
        "import math, collections, hashlib\nassert math.gcd(4, 6) == 2\n",
    ]
    results = run_programs(programs, QUICK, workers=2)
    assert [r.result for r in results] == [
        "passed", "failed: AssertionError", "failed: SyntaxError", "failed: KeyError", "passed"]
    assert [r.passed for r in results] == [True, False, False, False, True]


def test_hanging_program_times_out():
    result = run_program("while True:\n    pass\n", SandboxConfig(timeout_s=1.0))
    assert result.result == "timed out" and not result.passed
    result = run_program("import time\ntime.sleep(60)\n", SandboxConfig(timeout_s=1.0))
    assert result.result == "timed out"


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
    "forked child passes, parent fails": (
        "import os, time\nif os.fork() == 0:\n    pass\nelse:\n    time.sleep(0.3)\n"
        "    assert False\n", "failed: AssertionError"),
}


def test_hostile_programs_do_not_disturb_the_others():
    good = _prog("""
        import os
        open('scratch.txt', 'w').write('x' * 1000)   # its own working directory
        assert os.listdir('.') == ['scratch.txt']      # fresh: nobody else's files
        print('y' * (4 << 20))                         # megabytes of output go nowhere
        assert sum(i * i for i in range(100)) == 328350
    """)
    programs, expected = [], []
    for program, result in HOSTILE.values():
        programs += [program, good]
        expected += [result, "passed"]
    results = run_programs(programs, QUICK, workers=4)
    assert [r.result for r in results] == expected


def test_killing_the_parent_or_everyone_only_fails_that_program():
    isolation = isolation_report(QUICK)
    if not isolation["pid_namespace"] and isolation["uid"] == os.getuid():
        # Neither a PID namespace nor another uid: kill(-1, 9) would reach this very test run.
        pytest.skip("no PID namespace and no uid switch on this machine")
    good = "assert 2 + 2 == 4\n"
    programs = [
        "import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(5)\n",
        good,
        "import os\nos.kill(-1, 9)\nimport time\ntime.sleep(5)\n",
        good,
        "import os\nos.killpg(0, 9)\n",
        good,
    ]
    results = run_programs(programs, SandboxConfig(timeout_s=3.0), workers=3)
    assert [r.passed for r in results] == [False, True, False, True, False, True]


def test_leftover_processes_are_killed():
    # A daemon that escapes with setsid and a double fork, then sleeps: the program itself passes,
    # and nothing of it may survive the run. A private uid range identifies its processes.
    config = SandboxConfig(timeout_s=10.0, uid_base=10_000_000)
    program = _prog("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(120)
            os._exit(0)
        time.sleep(0.2)
    """)
    assert run_program(program, config).result == "passed"
    if IS_ROOT:
        assert _uids_alive(10_000_000, 20_000_000) == []


def test_environment_and_working_directory_are_fresh(monkeypatch):
    monkeypatch.setenv("MEGAFIM_TEST_SECRET", "s3cret")
    program = _prog(f"""
        import os
        assert 'MEGAFIM_TEST_SECRET' not in os.environ
        assert os.getcwd() != {str(os.getcwd())!r}
        assert os.listdir('.') == []
    """)
    assert run_program(program, QUICK).result == "passed"


@pytest.mark.skipif(not IS_ROOT, reason="privileges are dropped only when the harness is root")
def test_code_runs_unprivileged_and_cannot_write_outside(tmp_path):
    target = tmp_path / "pwned"
    program = f"open({str(target)!r}, 'w').write('x')\n"
    assert run_program(program, QUICK).result == "failed: PermissionError"
    assert not target.exists()
    assert run_program("import os\nassert os.getuid() != 0\n", QUICK).passed
    # The same write works without the privilege drop: the check above can fail.
    assert run_program(program, SandboxConfig(timeout_s=10.0, drop_privileges=False)).passed
    assert target.exists()


def test_network_is_unreachable_when_isolated():
    if not isolation_report(QUICK)["network_namespace"]:
        pytest.skip("this OS does not let the harness create a network namespace")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        assert run_program(program, QUICK).result == "failed: OSError"
        # Without the namespace the same connection succeeds: the check above can fail.
        open_net = SandboxConfig(timeout_s=10.0, isolate_network=False)
        assert run_program(program, open_net).result == "passed"


def test_config_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxConfig(memory_mb=0)
    with pytest.raises(ValueError, match="max_open_files"):
        SandboxConfig(max_open_files=4)
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass\n"], QUICK, workers=-1)


def test_memory_limit_is_the_configured_one():
    program = "x = bytearray(300 << 20)\nx[-1] = 1\n"
    assert run_program(program, SandboxConfig(timeout_s=10.0, memory_mb=200)).result == \
        "failed: MemoryError"
    assert run_program(program, SandboxConfig(timeout_s=10.0, memory_mb=1024)).passed
