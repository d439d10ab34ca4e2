"""Which files a corpus given on the command line is made of: one rule for every tool that reads one.

``tools/train_tokenizer.py`` and ``tools/preprocess_data.py`` (``megafim.data.preprocess``) both call
``find_input_files``, so a directory gives the same files to the tokenizer as to the dataset.
Each item of ``--input`` is, in this order:

- a directory: searched recursively for source and text files (``SOURCE_SUFFIXES``; never JSONL),
  skipping caches, VCS metadata, installed packages (``EXCLUDED_DIRS``) and hidden directories
  (``.venv``, ``.tox``, ...) below it; files sorted by path;
- an existing path that is not a directory (a file, or a pipe such as ``<(zcat corpus.jsonl.gz)``):
  taken as it is; JSON lines when its name ends in ``JSONL_SUFFIXES``, else one document;
- a glob (``*``, ``?``, ``[``; ``**`` recursive): its matches in sorted order, each taken as above;
- anything else is an error naming the flag and the item.

A file named twice is kept once, at its first place. Whether JSONL and source files may be mixed is
the caller's choice: the tokenizer trainer reads both, the preprocessor takes one kind per run.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
SOURCE_SUFFIXES = (
    ".py", ".pyi", ".pyx", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cu", ".cuh", ".rs", ".go",
    ".java", ".kt", ".scala", ".js", ".jsx", ".ts", ".tsx", ".rb", ".php", ".cs", ".swift", ".m",
    ".lua", ".pl", ".r", ".jl", ".sh", ".bash", ".zsh", ".sql", ".html", ".css", ".xml", ".yaml",
    ".yml", ".toml", ".ini", ".cfg", ".md", ".rst", ".txt", ".tex",
)
# Never searched inside a directory: caches, VCS metadata, and installed third-party packages (the
# stdlib directory holds site-packages, which is not the stdlib). Hidden directories are skipped too.
EXCLUDED_DIRS = ("__pycache__", ".git", ".hg", ".svn", "node_modules", "site-packages", "dist-packages")


def is_jsonl(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(JSONL_SUFFIXES)


@dataclass(frozen=True)
class InputFiles:
    """The files of a corpus, in reading order."""

    files: tuple[str, ...]

    @property
    def jsonl(self) -> tuple[str, ...]:
        """The JSON-lines files (one document per line)."""
        return tuple(f for f in self.files if is_jsonl(f))

    @property
    def sources(self) -> tuple[str, ...]:
        """The other files (one document each)."""
        return tuple(f for f in self.files if not is_jsonl(f))


def find_input_files(inputs: list[str] | tuple[str, ...], flag: str = "--input",
                     extensions: tuple[str, ...] = SOURCE_SUFFIXES,
                     exclude_dirs: tuple[str, ...] = EXCLUDED_DIRS) -> InputFiles:
    """The files named by ``inputs`` (see the module docstring); errors name ``flag`` and the item."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    exts = tuple(e.lower() for e in extensions)
    files: dict[str, None] = {}  # ordered set
    for item in map(os.fspath, inputs):
        if os.path.exists(item):
            found = _expand(item, exts, exclude_dirs)
            if not found:
                raise FileNotFoundError(f"{flag} {item!r}: the directory holds no file with a known text "
                                        f"extension ({', '.join(exts[:8])}, ...)")
        elif glob.has_magic(item):
            found = [f for match in sorted(glob.glob(item, recursive=True)) for f in _expand(match, exts, exclude_dirs)]
            if not found:
                raise FileNotFoundError(f"{flag} {item!r}: the glob matches no file")
        else:
            raise FileNotFoundError(f"{flag} {item!r}: no such file or directory")
        files.update(dict.fromkeys(found))
    return InputFiles(tuple(files))


def _expand(path: str, exts: tuple[str, ...], exclude_dirs: tuple[str, ...]) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs and not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(exts) and os.path.isfile(os.path.join(dirpath, f)))
    return found
