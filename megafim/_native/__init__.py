"""The compiled C++ extensions, one module per ``csrc/<name>.cpp`` (built by ``setup.py``)."""

import importlib
from types import ModuleType


def load(name: str) -> ModuleType:
    """Import ``megafim._native.<name>``, with an error that says how to build it when it is missing."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as err:
        raise ImportError(
            f"megafim's C++ extension '{name}' could not be imported ({err}). Build the extensions with "
            "`pip install -e .` (or `python setup.py build_ext --inplace`) in the megafim checkout."
        ) from err
