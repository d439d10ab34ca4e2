"""Corpora to tokenized ``.bin/.idx`` datasets: the library behind ``tools/preprocess_data.py``.

The work runs in the C++ pipeline (``csrc/preprocess_pipeline.cpp``) on ``workers`` encoding threads
with the GIL released; Python only finds the inputs, shows a tqdm progress bar and prints the closing
summary. Inputs are JSON-lines files (one document per line, text under each of ``json_keys``) or
source files (a directory, glob or file list; one document per file). Each key gets its own dataset
``<output_prefix>_<key>_document.bin/.idx``, in Megatron-LM's format (``docs/data_format.md``).
Bad documents are skipped and reported by reason with ``file:line`` (``strict`` stops at the first),
and outputs appear only when complete (``docs/preprocessing.md``). With ``group_by_key``, the records
of one repository become one document (``<repo_name>NAME<file_sep>PATH\nCONTENT...``, files sorted
by path; ``csrc/repo_grouper.h``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megafim.data.inputs import EXCLUDED_DIRS, JSONL_SUFFIXES, SOURCE_SUFFIXES, find_input_files  # noqa: F401
from megafim.data.output_lock import OutputLock

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
    group_by_key: str | None = None
    """JSONL: records with the same string under this key (e.g. ``repo``) become one document,
    ``<repo_name>NAME<file_sep>PATH\nCONTENT<file_sep>...`` with the files sorted by path."""
    path_key: str | None = None
    """With ``group_by_key``: the key holding each record's path in its repository (e.g. ``path``)."""
    max_group_bytes: int = 256 * 2**20
    """With ``group_by_key``: the most text (paths + contents) held for repositories not yet written;
    a bigger repository is split into several documents (reported in the summary)."""

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
        self._validate_grouping()

    def _validate_grouping(self) -> None:
        if self.path_key is not None and self.group_by_key is None:
            raise ValueError(f"--path-key {self.path_key!r}: only used with --group-by-key")
        if self.group_by_key is None:
            return
        if not self.group_by_key:
            raise ValueError("--group-by-key: must not be empty")
        if not self.path_key:
            raise ValueError(f"--group-by-key {self.group_by_key!r}: needs --path-key (the key of each file's path)")
        if len(self.json_keys) != 1:
            raise ValueError(f"--group-by-key {self.group_by_key!r}: takes one --json-keys key, got {self.json_keys}")
        keys = [self.json_keys[0], self.group_by_key, self.path_key]
        if len(set(keys)) != 3:
            raise ValueError(f"--group-by-key {self.group_by_key!r}, --path-key {self.path_key!r} and "
                             f"--json-keys {self.json_keys[0]!r} must be three different keys")
        if self.max_group_bytes < 1:
            raise ValueError(f"--max-group-bytes {self.max_group_bytes}: must be >= 1")

    def output_prefixes(self) -> list[str]:
        return [f"{self.output_prefix}_{key}_document" for key in self.json_keys]


def resolve_inputs(inputs: list[str]) -> tuple[list[str], bool]:
    """The input files in a fixed order (``megafim.data.inputs.find_input_files``: the same rule as the
    tokenizer trainer's), and whether they are JSONL (else: one document per file).

    JSONL and source files cannot be mixed in one run.
    """
    found = find_input_files(inputs)
    jsonl, sources = found.jsonl, found.sources
    if jsonl and sources:
        raise ValueError(f"inputs mix JSONL ({jsonl[0]}) and source files ({sources[0]}); preprocess them separately")
    return list(found.files), bool(jsonl)


class NoDocumentsError(ValueError):
    """Every document was skipped (or the inputs hold none): nothing was written. ``summary`` says why."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary


def run_preprocess(config: PreprocessConfig) -> dict:
    """Preprocess ``config.inputs``; returns the summary (see ``format_summary``).

    Raises ``ValueError`` on the first bad document when ``config.strict``, ``NoDocumentsError`` when
    no document is left to write; on any error or interrupt (KeyboardInterrupt, SystemExit) the
    temporary outputs are removed and earlier outputs kept.
    """
    from megafim._native import load
    from megafim.data.indexed import CODE_OF_DTYPE, optimal_dtype
    from megafim.data.tokenizer import load_tokenizer

    files, jsonl = resolve_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer_model, config.tokenizer_type, config.special_tokens or None)
    if config.group_by_key is not None:
        check_grouping_inputs(files, jsonl, tokenizer, config)
    native = load("preprocess_pipeline")
    cfg = native.PipelineConfig()
    cfg.inputs, cfg.jsonl = files, jsonl
    cfg.keys = list(config.json_keys if jsonl else config.json_keys[:1])
    cfg.output_prefixes = config.output_prefixes()[:len(cfg.keys)]
    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    cfg.dtype_code = CODE_OF_DTYPE[dtype]
    cfg.append_eod, cfg.eod = config.append_eod, tokenizer.eod
    cfg.workers, cfg.strict, cfg.block_bytes = config.workers, config.strict, config.block_bytes
    if config.group_by_key is not None:
        cfg.group_key, cfg.path_key = config.group_by_key, config.path_key
        cfg.repo_name_id, cfg.file_sep_id = tokenizer.repo_name, tokenizer.file_sep
        cfg.max_group_bytes = config.max_group_bytes
    for prefix in cfg.output_prefixes:
        make_output_directory(prefix)
    total_bytes = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    start = time.perf_counter()
    # Held until the outputs are renamed into place: a second run at these prefixes fails at once.
    with OutputLock(cfg.output_prefixes) as lock:
        if hasattr(tokenizer, "encode_flat"):  # Hugging Face: each job's texts in one Rust batch call
            pipeline = native.Pipeline(cfg, tokenizer.encode_flat)
        else:
            pipeline = native.Pipeline(cfg, *tokenizer.model_spec())
        try:
            finished = _run_with_progress(pipeline, total_bytes, config)
        except native.NoDocuments:
            summary = dict(pipeline.summary(), inputs=len(files), outputs=list(cfg.output_prefixes))
            raise NoDocumentsError(_no_documents_message(summary, list(cfg.keys)), summary) from None
    summary = dict(pipeline.summary())
    summary.update(seconds=time.perf_counter() - start, inputs=len(files), jsonl=jsonl,
                   outputs=list(cfg.output_prefixes), dtype=str(dtype), tokenizer=tokenizer.model_path,
                   workers=config.workers, completed=finished, removed_temporaries=lock.removed)
    return summary


def check_grouping_inputs(files: list[str], jsonl: bool, tokenizer, config: PreprocessConfig) -> None:
    """Before any work: grouping takes JSONL, a tokenizer with ``<repo_name>`` / ``<file_sep>``, and
    records with string group and path values (each file's first record is checked here; a later
    record without them stops the run there, naming its ``file:line``)."""
    from megafim.data.tokenizer import require_repo_tokens

    if not jsonl:
        raise ValueError(f"--group-by-key {config.group_by_key!r}: needs JSONL inputs (records with a "
                         f"repository and a path), got source files ({files[0]})")
    require_repo_tokens(tokenizer, "--group-by-key")
    for path in files:
        line_no, record = _first_record(path)
        if not isinstance(record, dict):
            continue  # empty, or malformed: skipped and reported like any bad line
        for flag, key in (("--group-by-key", config.group_by_key), ("--path-key", config.path_key)):
            if not isinstance(record.get(key), str):
                what = "no such key" if key not in record else "a non-string value"
                raise ValueError(f"{path}:{line_no}: {flag} {key}: the record has {what}")


def _first_record(path: str) -> tuple[int, object]:
    """(line number, parsed JSON) of the first non-blank line, or (0, None)."""
    import json

    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    return line_no, json.loads(raw)
                except ValueError:
                    return line_no, None
    return 0, None


def make_output_directory(prefix: str) -> None:
    """Create the directory of ``prefix``, saying which part is in the way when it cannot be made."""
    parent = Path(prefix).parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(f"output_prefix {prefix}: {p} is a file, not a directory")
            if p == parent and not os.access(p, os.W_OK | os.X_OK):
                raise PermissionError(f"output_prefix {prefix}: the directory {p} is not writable")
            break
    parent.mkdir(parents=True, exist_ok=True)


def _no_documents_message(summary: dict, keys: list[str]) -> str:
    """One line: why no document was left, with the first locations of each reason."""
    skipped = summary["skipped"]
    outputs = ", ".join(f"{p}.bin/.idx" for p in summary["outputs"])
    if not skipped:
        blank = summary.get("blank_lines", 0)
        what = f"only {blank:,} blank line(s)" if blank else "nothing"
        return f"no documents: the {summary['inputs']} input file(s) hold {what}; wrote nothing ({outputs})"
    examples = summary["skipped_examples"]
    reasons = "; ".join(f"{reason} {count:,} (first: {', '.join(f'{p}:{n}' for p, n in examples[reason][:2])})"
                        for reason, count in sorted(skipped.items()))
    hint = f" (json_keys {keys}: is the key right?)" if set(skipped) == {"missing_key"} else ""
    return (f"no documents: all {sum(skipped.values()):,} were skipped: {reasons}{hint}; "
            f"wrote nothing ({outputs})")


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
    if "grouped_records" in summary:
        lines.append(f"  grouped:   {summary['grouped_records']:,} records into {summary['documents']:,} "
                     f"repository documents")
    if summary.get("split_groups"):
        names = ", ".join(f"{name} ({parts} documents)" for name, parts in summary["split_examples"])
        more = ", ..." if summary["split_groups"] > len(summary["split_examples"]) else ""
        lines.append(f"  split:     {summary['split_groups']:,} repositories went over --max-group-bytes "
                     f"(too big, or interleaved with others) and were written as several documents: "
                     f"{names}{more}")
    if summary.get("blank_lines"):
        lines.append(f"  blank lines ignored: {summary['blank_lines']:,}")
    if summary.get("removed_temporaries"):
        lines.append(f"  removed {len(summary['removed_temporaries'])} temporary file(s) left by an "
                     "interrupted run")
    for prefix in summary["outputs"]:
        lines.append(f"  wrote {prefix}.bin / {prefix}.idx")
    return "\n".join(lines)
