"""Corpora to tokenized ``.bin/.idx`` datasets: the library behind ``tools/preprocess_data.py``.

The work runs in the C++ pipeline (``csrc/preprocess_pipeline.cpp``) on ``workers`` encoding threads
with the GIL released; Python only finds the inputs, shows a tqdm progress bar and prints the closing
summary. Inputs are JSON-lines files (one document per line, text under each of ``json_keys``) or
source files (a directory, glob or file list; one document per file). Each key gets its own dataset
``<output_prefix>_<key>_document.bin/.idx``, in Megatron-LM's format (``docs/data_format.md``).
Bad documents are skipped and reported by reason with ``file:line`` (``strict`` stops at the first),
and outputs appear only when complete (``docs/preprocessing.md``).
"""

from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
SOURCE_SUFFIXES = (
    ".py", ".pyi", ".pyx", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cu", ".cuh", ".rs", ".go",
    ".java", ".kt", ".scala", ".js", ".jsx", ".ts", ".tsx", ".rb", ".php", ".cs", ".swift", ".m",
    ".lua", ".pl", ".r", ".jl", ".sh", ".bash", ".zsh", ".sql", ".html", ".css", ".xml", ".yaml",
    ".yml", ".toml", ".ini", ".cfg", ".md", ".rst", ".txt", ".tex",
)
# Never searched inside a directory: caches, VCS metadata, and installed third-party packages (the
# stdlib directory holds site-packages, which is not the stdlib).
EXCLUDED_DIRS = ("__pycache__", ".git", ".hg", ".svn", "node_modules", "site-packages", "dist-packages")


@dataclass
class PreprocessConfig:
    """One preprocessing run; validated on construction."""

    inputs: list[str]
    """JSONL files, or source files / directories / globs (one document per file); not both kinds."""
    output_prefix: str
    """Outputs are ``<output_prefix>_<key>_document.bin/.idx``."""
    tokenizer_model: str
    """A model trained by ``tools/train_tokenizer.py``, or a Hugging Face ``tokenizer.json`` / directory."""
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    """JSONL: the keys whose strings are tokenized (one dataset each). Source files: the first names the output."""
    append_eod: bool = False
    """Append the end-of-document id to every document."""
    workers: int = 1
    """Encoding threads."""
    strict: bool = False
    """Fail on the first bad document instead of skipping it."""
    progress: bool = True
    """Show a tqdm progress bar."""
    log_interval: float = 0.5
    """Seconds between progress-bar updates."""
    block_bytes: int = 1 << 20
    """Input read per job (whole lines / whole files); bounds memory with ``workers``."""
    tokenizer_type: str | None = None
    """``GPTSentencePieceTokenizer`` or ``HuggingFaceTokenizer``; None: from the path (docs/tokenizer.md)."""
    special_tokens: dict = field(default_factory=dict)
    """Spellings of ``eod`` / ``fim_*`` in a Hugging Face tokenizer, when not the known ones."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike)):
            self.inputs = [os.fspath(self.inputs)]
        if not self.inputs:
            raise ValueError("inputs: at least one input is needed")
        if not self.json_keys or any(not k for k in self.json_keys):
            raise ValueError(f"json_keys {self.json_keys!r}: need at least one non-empty key")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"json_keys {self.json_keys!r}: repeated key")
        if self.workers < 1:
            raise ValueError(f"workers {self.workers}: must be >= 1")
        if self.block_bytes < 1:
            raise ValueError(f"block_bytes {self.block_bytes}: must be >= 1")
        if self.log_interval <= 0:
            raise ValueError(f"log_interval {self.log_interval}: must be > 0")
        if not self.output_prefix:
            raise ValueError("output_prefix: must not be empty")

    def output_prefixes(self) -> list[str]:
        return [f"{self.output_prefix}_{key}_document" for key in self.json_keys]


def _is_jsonl(path: str) -> bool:
    return path.lower().endswith(JSONL_SUFFIXES)


def _walk_sources(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(SOURCE_SUFFIXES))
    return found


def resolve_inputs(inputs: list[str]) -> tuple[list[str], bool]:
    """The input files in a fixed order, and whether they are JSONL (else: one document per file).

    A directory is searched recursively for source files (``SOURCE_SUFFIXES``, never JSONL); a glob is expanded
    (sorted); a file is taken as it is. JSONL and source files cannot be mixed.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = _walk_sources(item)
        elif os.path.exists(item):  # a file, or a pipe such as <(zcat corpus.jsonl.gz)
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"input {item!r}: no such file, or no matching files")
        files.extend(found)
    kinds = {_is_jsonl(f) for f in files}
    if len(kinds) > 1:
        jsonl = next(f for f in files if _is_jsonl(f))
        source = next(f for f in files if not _is_jsonl(f))
        raise ValueError(f"inputs mix JSONL ({jsonl}) and source files ({source}); preprocess them separately")
    return files, kinds.pop()


def run_preprocess(config: PreprocessConfig) -> dict:
    """Preprocess ``config.inputs``; returns the summary (see ``format_summary``).

    Raises ``ValueError`` on the first bad document when ``config.strict``; on any error or interrupt
    (KeyboardInterrupt, SystemExit) the temporary outputs are removed and earlier outputs kept.
    """
    from megafim._native import load
    from megafim.data.indexed import CODE_OF_DTYPE, optimal_dtype
    from megafim.data.tokenizer import load_tokenizer

    files, jsonl = resolve_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer_model, config.tokenizer_type, config.special_tokens or None)
    native = load("preprocess_pipeline")
    cfg = native.PipelineConfig()
    cfg.inputs, cfg.jsonl = files, jsonl
    cfg.keys = list(config.json_keys if jsonl else config.json_keys[:1])
    cfg.output_prefixes = config.output_prefixes()[:len(cfg.keys)]
    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    cfg.dtype_code = CODE_OF_DTYPE[dtype]
    cfg.append_eod, cfg.eod = config.append_eod, tokenizer.eod
    cfg.workers, cfg.strict, cfg.block_bytes = config.workers, config.strict, config.block_bytes
    for prefix in cfg.output_prefixes:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    if hasattr(tokenizer, "encode_flat"):  # Hugging Face: each job's texts in one Rust batch call
        pipeline = native.Pipeline(cfg, tokenizer.encode_flat)
    else:
        pipeline = native.Pipeline(cfg, *tokenizer.model_spec())
    total_bytes = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    start = time.perf_counter()
    finished = _run_with_progress(pipeline, total_bytes, config)
    summary = dict(pipeline.summary())
    summary.update(seconds=time.perf_counter() - start, inputs=len(files), jsonl=jsonl,
                   outputs=list(cfg.output_prefixes), dtype=str(dtype),
                   tokenizer=tokenizer.model_path, workers=config.workers, completed=finished)
    return summary


def _run_with_progress(pipeline, total_bytes: int, config: PreprocessConfig) -> bool:
    """Runs the pipeline on a thread (it releases the GIL) while this thread draws the progress bar.

    This thread waits on an Event, never on Thread.join: a signal handler that raises inside join()
    (Ctrl-C, our SIGTERM handler) can leave the thread marked as finished while it still runs
    (CPython bpo-45274), and the cleanup below must wait for the real end.
    """
    outcome: dict = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["finished"] = pipeline.run()
        except BaseException as err:  # handed to the calling thread below
            outcome["error"] = err
        finally:
            done.set()

    thread = threading.Thread(target=target, name="megafim-preprocess", daemon=True)
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                   desc="preprocess", mininterval=config.log_interval)
    start = time.perf_counter()
    thread.start()
    try:
        while not done.wait(config.log_interval):
            if bar is not None:
                _update_bar(bar, pipeline.progress(), time.perf_counter() - start)
    except BaseException:
        pipeline.cancel()  # Ctrl-C / SystemExit: stop the threads; run() removes the temporary files
        while not done.wait(0.1):
            pass
        raise
    finally:
        if bar is not None:
            _update_bar(bar, pipeline.progress(), time.perf_counter() - start)
            bar.close()
    if "error" in outcome:
        raise outcome["error"]
    if not outcome.get("finished"):
        raise KeyboardInterrupt("preprocessing was cancelled; no outputs were written")
    return True


def _update_bar(bar, progress: tuple[int, int, int, int], elapsed: float) -> None:
    docs, tokens, nbytes, skipped = progress
    bar.update(nbytes - bar.n)
    rate = max(elapsed, 1e-9)
    bar.set_postfix_str(f"{docs / rate:,.0f} docs/s, {tokens / rate / 1e6:.2f}M tok/s, skipped {skipped}",
                        refresh=False)


def format_summary(summary: dict) -> str:
    """The closing report: documents, tokens, skipped input by reason (first locations), time."""
    secs = summary["seconds"]
    mb = summary["input_bytes"] / 2**20
    lines = [
        f"preprocessed {summary['inputs']} input file(s), {mb:,.1f} MiB, in {secs:.2f} s "
        f"with {summary['workers']} worker(s)",
        f"  documents: {summary['documents']:,} ({summary['documents'] / max(secs, 1e-9):,.0f}/s)",
        f"  tokens:    {summary['tokens']:,} ({summary['tokens'] / max(secs, 1e-9) / 1e6:,.2f}M/s, "
        f"{mb / max(secs, 1e-9):,.1f} MiB/s), dtype {summary['dtype']}",
    ]
    skipped = summary["skipped"]
    if skipped:
        lines.append(f"  skipped:   {sum(skipped.values()):,}")
        for reason, count in sorted(skipped.items()):
            where = ", ".join(f"{path}:{line}" for path, line in summary["skipped_examples"][reason])
            more = ", ..." if count > len(summary["skipped_examples"][reason]) else ""
            lines.append(f"    {reason}: {count:,} (first: {where}{more})")
    else:
        lines.append("  skipped:   none")
    if summary.get("blank_lines"):
        lines.append(f"  blank lines ignored: {summary['blank_lines']:,}")
    for prefix in summary["outputs"]:
        lines.append(f"  wrote {prefix}.bin / {prefix}.idx")
    return "\n".join(lines)
