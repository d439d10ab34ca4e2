"""Test-wide settings. They must be in the environment before megafim or triton is imported."""

import os

# pytest -n 2 runs two workers and the distributed tests launch several ranks each: on a 2-core
# machine, torch's default of one thread per core oversubscribes it many times over (~10x slower).
# One thread per process, set before torch loads, and inherited by every subprocess the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run on CPU tensors only through the interpreter, and it must be chosen
# before the @triton.jit decorators execute (docs/platform_notes.md). With one, the GPU tests (-m gpu) must run
# the compiled kernels, so the interpreter stays off.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed picks its CPU accelerator by itself; saying so silences its warning.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def small_tokenizer_path(tmp_path_factory) -> Path:
    """A 1200-piece tokenizer trained by tools/train_tokenizer.py on two stdlib packages (~1 s)."""
    prefix = tmp_path_factory.mktemp("small_tokenizer") / "tok"
    subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input", str(STDLIB / "json"),
                    str(STDLIB / "email"), "--vocab-size", "1200", "--output-prefix", str(prefix)],
                   check=True, capture_output=True)
    return Path(f"{prefix}.model")
