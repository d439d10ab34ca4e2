"""The README runs the tools by their path (``tools/preprocess_data.py ...``): each must be executable,
start with a python3 shebang, and import the megafim of its own checkout from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = sorted((REPO / "tools").glob("*.py"))


def test_every_tool_is_executable_with_a_python3_shebang():
    assert TOOLS
    for tool in TOOLS:
        assert os.access(tool, os.X_OK), f"{tool} is not executable"
        assert tool.read_text().startswith("#!/usr/bin/env python3\n"), tool
    # git records the mode, so a fresh clone gets it too
    listed = subprocess.run(["git", "ls-files", "-s", "tools"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        modes = {line.split()[3]: line.split()[0] for line in listed.stdout.splitlines()}
        assert all(mode == "100755" for path, mode in modes.items() if path.endswith(".py")), modes


@pytest.mark.parametrize("name", ["preprocess_data.py", "inspect_samples.py", "merge_datasets.py"])
def test_a_tool_runs_by_its_path_from_elsewhere(tmp_path, name):
    """No PYTHONPATH, another working directory: the shebang finds python3 (this interpreter's, put
    first on PATH) and the tool imports megafim from the checkout it lives in."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run([str(REPO / "tools" / name), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    # ... and the megafim it imported is this checkout's, not another installed copy
    where = subprocess.run([sys.executable, "-c",
                            f"import runpy, sys; sys.argv = [{str(REPO / 'tools' / name)!r}, '--help']\n"
                            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
                            "except SystemExit:\n    pass\n"
                            "import megafim; print('MEGAFIM', megafim.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert f"MEGAFIM {REPO / 'megafim' / '__init__.py'}" in where.stdout, where.stdout + where.stderr
