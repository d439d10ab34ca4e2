#!/usr/bin/env python3
"""Train megafim's tokenizer: a sentencepiece BPE model with byte fallback, lossless on code.

    python tools/train_tokenizer.py --input DIR_OR_FILES... --vocab-size 8192 --output-prefix tok/stdlib

Inputs are files, globs or directories (searched recursively for source/text files by extension;
hidden, cache, VCS and site-packages directories skipped), and JSON-lines files (``*.jsonl``,
``*.ndjson``, ``*.json``; the text is under ``--json-keys``), found by the same rule as
tools/preprocess_data.py (megafim/data/inputs.py). Writes ``<prefix>.model``,
``<prefix>.vocab`` and ``<prefix>.json`` (special ids, vocabulary size, every training setting).
See docs/tokenizer.md for why each setting is what it is.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megafim.data.inputs import EXCLUDED_DIRS, SOURCE_SUFFIXES, find_input_files  # noqa: E402
from megafim.data.tokenizer import (EOD_PIECE, FILE_SEP_PIECE, FIM_MIDDLE_PIECE, FIM_PAD_PIECE,  # noqa: E402
                                    FIM_PREFIX_PIECE, FIM_SUFFIX_PIECE, REPO_NAME_PIECE)

# The special tokens, in id order after <unk> (id 0) and end-of-text (id 1), as megafim/data/tokenizer.py
# names them.
FIM_PIECES = (FIM_PREFIX_PIECE, FIM_MIDDLE_PIECE, FIM_SUFFIX_PIECE, FIM_PAD_PIECE)
# After the FIM sentinels, so that FIM ids stay those of models trained before these existed.
REPO_PIECES = (REPO_NAME_PIECE, FILE_SEP_PIECE)  # repository-level documents (preprocess --group-by-key)
CONTROL_PIECES = FIM_PIECES + REPO_PIECES
N_META = 2 + len(CONTROL_PIECES)  # <unk>, end-of-text, the FIM sentinels, the repository tokens
N_BYTES = 256  # byte-fallback pieces <0x00>..<0xFF>

# The same source-file rule as tools/preprocess_data.py: which extensions a directory contributes, and
# which directories are never searched (caches, VCS metadata, installed third-party packages; hidden
# directories always).
DEFAULT_EXTENSIONS = SOURCE_SUFFIXES
DEFAULT_EXCLUDE_DIRS = EXCLUDED_DIRS


@dataclass
class TrainConfig:
    """What to train on and how; validated on construction."""

    inputs: list[str]
    vocab_size: int
    output_prefix: str
    json_keys: tuple[str, ...] = ("text",)
    threads: int = 2
    max_bytes: int = 256 * 2**20
    """Sampling cap on the training text (bytes); files are shuffled with ``seed`` and read until it."""
    max_sentence_bytes: int = 8192
    """Training "sentences" are multi-line chunks cut at line boundaries to at most this many bytes."""
    character_coverage: float = 0.9999
    """Wanted share of characters covered by pieces (sentencepiece's option); when the characters this
    needs do not fit in half of vocab_size, only the most frequent ones that fit are kept."""
    max_piece_length: int = 16
    seed: int = 0
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("--input: give at least one file, glob or directory")
        smallest = N_META + N_BYTES + 1
        if self.vocab_size < smallest:
            raise ValueError(f"--vocab-size {self.vocab_size}: must be at least {smallest} "
                             f"({N_META} special pieces + {N_BYTES} byte pieces + 1 character)")
        if not self.output_prefix:
            raise ValueError("--output-prefix: must not be empty")
        if self.threads < 1:
            raise ValueError(f"--threads {self.threads}: must be at least 1")
        if self.max_bytes < 1:
            raise ValueError(f"--max-bytes {self.max_bytes}: must be positive")
        if self.max_sentence_bytes < 64:
            raise ValueError(f"--max-sentence-bytes {self.max_sentence_bytes}: must be at least 64")
        if not 0.98 <= self.character_coverage <= 1.0:  # sentencepiece's own limits
            raise ValueError(f"--character-coverage {self.character_coverage}: must be in [0.98, 1]")
        if not self.json_keys:
            raise ValueError("--json-keys: give at least one key")


@dataclass
class CorpusStats:
    """What was read, and what was skipped and why (printed and stored in <prefix>.json)."""

    files: int = 0
    documents: int = 0
    sentences: int = 0
    bytes: int = 0
    skipped_binary: int = 0
    skipped_non_utf8: int = 0
    skipped_bad_json: int = 0
    skipped_missing_key: int = 0
    skipped_empty: int = 0
    truncated_by_max_bytes: bool = False
    examples: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(what)


# ---------------------------------------------------------------------------------------------------
# Finding and reading the corpus


def collect_inputs(config: TrainConfig) -> tuple[list[Path], list[Path]]:
    """Expand --input into (source files, JSONL files) by the rule tools/preprocess_data.py uses
    (megafim/data/inputs.py); both kinds may be given together. A path that matches nothing is an error."""
    found = find_input_files(config.inputs, "--input", config.extensions, config.exclude_dirs)
    return [Path(p) for p in found.sources], [Path(p) for p in found.jsonl]


def read_source_file(path: Path, stats: CorpusStats) -> str | None:
    """The file's text, or None (counted) when it is binary or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise OSError(f"--input: cannot read {path}: {err.strerror or err}") from err
    if b"\x00" in data:
        stats.skipped_binary += 1
        stats.note(f"{path}: binary (contains NUL bytes)")
        return None
    try:
        return data.decode("utf-8")  # bytes, not text mode: keep \r\n exactly
    except UnicodeDecodeError as err:
        stats.skipped_non_utf8 += 1
        stats.note(f"{path}: not UTF-8 (byte {err.start})")
        return None


def iter_jsonl_documents(path: Path, keys: tuple[str, ...], stats: CorpusStats):
    """Yield the text under each key of each line; malformed lines and missing keys are counted."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise OSError(f"--input: cannot read {path}: {err.strerror or err}") from err
    with handle:
        for line_no, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                stats.skipped_bad_json += 1
                stats.note(f"{path}:{line_no}: malformed JSON ({err})")
                continue
            for key in keys:
                value = record.get(key) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    stats.skipped_missing_key += 1
                    stats.note(f"{path}:{line_no}: no string under key {key!r}")
                    continue
                yield value


def split_sentences(text: str, max_bytes: int) -> list[str]:
    """Cut a document into chunks of whole lines, each at most max_bytes of UTF-8.

    Training sentences hold several lines so that newlines (and what follows them) are learnable
    characters; a single line longer than the limit is cut at character boundaries.
    """
    chunks: list[str] = []
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and buf:
            chunks.append("".join(buf))
            buf, size = [], 0
        if n > max_bytes:
            step = max_bytes // 4  # a character is at most 4 bytes
            chunks.extend(line[i:i + step] for i in range(0, len(line), step))
            continue
        buf.append(line)
        size += n
    if buf:
        chunks.append("".join(buf))
    return chunks


def load_corpus(config: TrainConfig) -> tuple[list[str], CorpusStats]:
    """Read the inputs (files shuffled with the seed, JSONL in order) into training sentences."""
    sources, jsonl = collect_inputs(config)
    random.Random(config.seed).shuffle(sources)
    stats = CorpusStats()
    sentences: list[str] = []

    def add(text: str) -> bool:
        if not text:
            stats.skipped_empty += 1
            return True
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        sentences.extend(split_sentences(text, config.max_sentence_bytes))
        if stats.bytes >= config.max_bytes:
            stats.truncated_by_max_bytes = True
            return False
        return True

    for path in sources:
        stats.files += 1
        text = read_source_file(path, stats)
        if text is not None and not add(text):
            break
    if not stats.truncated_by_max_bytes:
        for path in jsonl:
            stats.files += 1
            if not all(add(text) for text in iter_jsonl_documents(path, config.json_keys, stats)):
                break
    stats.sentences = len(sentences)
    if not sentences:
        raise ValueError(f"--input {' '.join(config.inputs)}: no usable text was found "
                         f"({_skip_summary(stats)})")
    return sentences, stats


def _skip_summary(stats: CorpusStats) -> str:
    return (f"{stats.files} files, {stats.documents} documents; skipped: {stats.skipped_binary} binary, "
            f"{stats.skipped_non_utf8} not UTF-8, {stats.skipped_bad_json} malformed JSON lines, "
            f"{stats.skipped_missing_key} missing keys, {stats.skipped_empty} empty")


# ---------------------------------------------------------------------------------------------------
# Choosing the character coverage


def count_characters(sentences: list[str]) -> Counter:
    """Character counts as sentencepiece's trainer sees them: spaces become U+2581, NUL is ignored."""
    counts = np.zeros(0x110000, dtype=np.int64)
    batch: list[str] = []
    size = 0
    for i, s in enumerate(sentences):
        batch.append(s)
        size += len(s)
        if size > 2**22 or i == len(sentences) - 1:  # bincount over code points, 4M characters at a time
            codes = np.frombuffer("".join(batch).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            counts += np.bincount(codes, minlength=0x110000)[:0x110000]
            batch, size = [], 0
    counts[0x2581] += counts[0x20]
    counts[0x20] = counts[0] = 0
    nonzero = np.flatnonzero(counts)
    return Counter({chr(c): int(counts[c]) for c in nonzero})


def kept_characters(counts: Counter, coverage: float) -> int:
    """How many characters sentencepiece's trainer makes pieces of at this coverage.

    Mirrors its loop: characters by falling count (ties by code point); before each one, stop when the
    share covered so far (compared in float32) reaches the coverage.
    """
    ordered = sorted(counts.values(), reverse=True)
    total = sum(ordered)
    coverage32 = np.float32(coverage)
    covered = 0
    for kept, n in enumerate(ordered):
        if np.float32(covered / total) >= coverage32:
            return kept
        covered += n
    return len(ordered)


def choose_characters(counts: Counter, vocab_size: int, wanted: float) -> tuple[float, set[str]]:
    """(coverage to train with, characters to drop from the training text).

    Characters may use at most half of the vocabulary left after the special and byte pieces, so that
    merges (what makes BPE worth having) keep at least half. When the wanted coverage needs more,
    only the most frequent characters that fit are kept: the others are cut out of the training text
    (sentencepiece refuses coverages under 0.98, which a corpus with thousands of rare CJK characters
    would need), and the model encodes them as byte-fallback pieces.
    """
    budget = max(1, (vocab_size - N_META - N_BYTES) // 2)
    if kept_characters(counts, wanted) <= budget:
        return wanted, set()
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], ord(kv[0])))
    return 1.0, {char for char, _ in ordered[budget:]}


def drop_characters(sentences: list[str], dropped: set[str]) -> list[str]:
    """Cut each sentence at the dropped characters (no merge may span where one was)."""
    if not dropped:
        return sentences
    table = str.maketrans({c: "\x00" for c in dropped})
    out = []
    for s in sentences:
        out.extend(part for part in s.translate(table).split("\x00") if part)
    return out


# ---------------------------------------------------------------------------------------------------
# Training


def trainer_settings(config: TrainConfig, coverage: float) -> dict:
    """The sentencepiece options; docs/tokenizer.md explains each."""
    return dict(
        model_type="bpe",
        vocab_size=config.vocab_size,
        character_coverage=coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        max_sentence_length=4 * config.max_sentence_bytes,
        max_sentencepiece_length=config.max_piece_length,
        unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
        eos_piece=EOD_PIECE,
        control_symbols=list(CONTROL_PIECES),
        num_threads=config.threads,
        shuffle_input_sentence=False,  # we sample ourselves (--max-bytes), with --seed
        minloglevel=2,
    )


def train(config: TrainConfig, log=print) -> dict:
    """Train, write <prefix>.model/.vocab/.json, and return what was written into the .json."""
    start = time.time()
    sentences, stats = load_corpus(config)
    counts = count_characters(sentences)
    coverage, dropped = choose_characters(counts, config.vocab_size, config.character_coverage)
    sentences = drop_characters(sentences, dropped)
    n_chars = kept_characters(counts, coverage) if not dropped else len(counts) - len(dropped)
    log(f"corpus: {stats.bytes / 1e6:.1f} MB in {stats.sentences} chunks; {_skip_summary(stats)}"
        + (" (capped by --max-bytes)" if stats.truncated_by_max_bytes else ""))
    for example in stats.examples:
        log(f"  skipped {example}")
    log(f"characters: {len(counts)} distinct; {n_chars} become pieces, the rest are encoded as bytes"
        + (f" ({len(dropped)} rarest cut from the training text to fit --vocab-size)" if dropped else ""))
    settings = trainer_settings(config, coverage)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **settings)
    except RuntimeError as err:
        raise ValueError(f"sentencepiece training failed for --vocab-size {config.vocab_size}: {err}") from err
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if processor.vocab_size() != config.vocab_size:
        raise ValueError(f"--vocab-size {config.vocab_size} is too large for this corpus: sentencepiece "
                         f"found only {processor.vocab_size()} pieces; use a smaller vocabulary or more text")
    return _write_outputs(config, processor, model.getvalue(), settings, stats, n_chars, dropped,
                          time.time() - start)


def _write_outputs(config, processor, model_bytes, settings, stats, n_chars, dropped, seconds) -> dict:
    prefix = Path(config.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    special = {"eod": processor.piece_to_id(EOD_PIECE)}
    special.update({p.strip("<>"): processor.piece_to_id(p) for p in CONTROL_PIECES})
    info = {
        "format": "megafim-tokenizer", "version": 1,
        "model": prefix.name + ".model",
        "model_type": "bpe",
        "vocab_size": processor.vocab_size(),
        "special_ids": special,
        "special_pieces": {"eod": EOD_PIECE, **{p.strip("<>"): p for p in CONTROL_PIECES}},
        "unk_id": processor.unk_id(),
        "byte_fallback_ids": [processor.piece_to_id(f"<0x{b:02X}>") for b in (0, 255)],
        "character_pieces": n_chars,
        "characters_cut_from_training": len(dropped),
        "sentencepiece_settings": {k: v for k, v in settings.items() if k not in ("minloglevel",)},
        "config": {**asdict(config), "extensions": list(config.extensions),
                   "exclude_dirs": list(config.exclude_dirs)},
        "corpus": asdict(stats),
        "train_seconds": round(seconds, 2),
    }
    _atomic_write(prefix.with_name(prefix.name + ".model"), model_bytes)
    # Pieces may hold newlines and tabs: written JSON-escaped so that each piece is one line.
    vocab = "".join(f"{json.dumps(processor.id_to_piece(i), ensure_ascii=False)[1:-1]}\t{processor.get_score(i):g}\n"
                    for i in range(processor.vocab_size()))
    _atomic_write(prefix.with_name(prefix.name + ".vocab"), vocab.encode("utf-8"))
    _atomic_write(prefix.with_name(prefix.name + ".json"), (json.dumps(info, indent=2) + "\n").encode())
    return info


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs, directories or *.jsonl files")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding text in JSONL inputs")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.model, .vocab and .json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-bytes", type=int, default=TrainConfig.max_bytes, help="sampling cap on training text")
    p.add_argument("--max-sentence-bytes", type=int, default=TrainConfig.max_sentence_bytes)
    p.add_argument("--character-coverage", type=float, default=TrainConfig.character_coverage)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extensions", nargs="+", default=list(DEFAULT_EXTENSIONS),
                   help="file suffixes searched for in directories")
    p.add_argument("--exclude-dirs", nargs="*", default=list(DEFAULT_EXCLUDE_DIRS),
                   help="directory names skipped when searching directories")
    a = p.parse_args(argv)
    return TrainConfig(inputs=a.input, vocab_size=a.vocab_size, output_prefix=a.output_prefix,
                       json_keys=tuple(a.json_keys), threads=a.threads, max_bytes=a.max_bytes,
                       max_sentence_bytes=a.max_sentence_bytes, character_coverage=a.character_coverage,
                       seed=a.seed, extensions=tuple(a.extensions), exclude_dirs=tuple(a.exclude_dirs))


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        info = train(config)
    except (ValueError, OSError) as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 2
    ids = ", ".join(f"{k}={v}" for k, v in info["special_ids"].items())
    print(f"wrote {config.output_prefix}.model/.vocab/.json: vocab {info['vocab_size']}, special ids {ids}, "
          f"{info['train_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
