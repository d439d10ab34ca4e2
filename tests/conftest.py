"""Test-wide settings. They must be in the environment before megafim or triton is imported."""

import os

# Triton kernels run on CPU tensors only through the interpreter, and it must be chosen before the
# @triton.jit decorators execute (ENVIRONMENT.md).
os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed picks its CPU accelerator by itself; saying so silences its warning.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
