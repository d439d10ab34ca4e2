"""A Hugging Face byte-level BPE tokenizer (``tokenizer.json``) behind megafim's tokenizer interface.

Llama 3, Qwen2.5-Coder, StarCoder2 and DeepSeek-Coder ship byte-level BPE tokenizers: every token is a
string of bytes written with GPT-2's byte-to-unicode alphabet, so every text has an encoding and
``decode(encode(text)) == text`` (after the tokenizer's normalizer, if it has one). Encoding runs in
the ``tokenizers`` library (Rust). End-of-text and the FIM sentinels are found by their known
spellings (``SPELLINGS``) or named by the caller. See docs/tokenizer.md.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from megafim._native import load as _load_native
from megafim.data.tokenizer import decode_with_table

# The names of the special tokens megafim uses, with their spellings in the tokenizers people have,
# first match wins. StarCoder / SantaCoder, Qwen2.5-Coder, DeepSeek-Coder (its "hole" marks where the
# middle was, i.e. the suffix follows; its "end" starts the middle), and common pad tokens.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "eod": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<｜end▁of▁sentence｜>", "<eos>"),
    "fim_prefix": ("<fim_prefix>", "<|fim_prefix|>", "<｜fim▁begin｜>"),
    "fim_middle": ("<fim_middle>", "<|fim_middle|>", "<｜fim▁end｜>"),
    "fim_suffix": ("<fim_suffix>", "<|fim_suffix|>", "<｜fim▁hole｜>"),
    "fim_pad": ("<fim_pad>", "<|fim_pad|>", "<pad>", "<|pad|>", "<｜▁pad▁｜>"),
    "repo_name": ("<repo_name>",),  # repository-level documents (StarCoder2's spellings)
    "file_sep": ("<file_sep>",),
}
FIM_NAMES = ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad")
# The spellings tools/add_fim_tokens.py adds to a tokenizer that has none.
DEFAULT_FIM_SPELLINGS = {"fim_prefix": "<|fim_prefix|>", "fim_middle": "<|fim_middle|>",
                         "fim_suffix": "<|fim_suffix|>", "fim_pad": "<|fim_pad|>"}

# Pre-tokenizer regexes under which no piece holds an ASCII non-whitespace character followed by a
# space, and whose matches need no context before them (no look-behind, no anchors): splitting a text
# there and encoding both sides gives the ids of the whole (csrc/fim.cpp re-encodes only up to such
# positions). GPT-2 (also ByteLevel's own regex), Llama 3, Qwen2.
SPACE_SAFE_REGEXES = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# FIM word-boundary rules of csrc/fim.cpp: none (re-encode whole parts), a space after a non-space
# (megafim's sentencepiece models), a space after an ASCII non-whitespace byte (the regexes above),
# that or a newline whose following whitespace holds no newline and ends at an ASCII non-whitespace
# byte (Llama 3 and Qwen2's regexes, applied first: their `\s*[\r\n]+` ends a pre-token there).
BOUNDARY_NONE, BOUNDARY_SPACE, BOUNDARY_ASCII_SPACE, BOUNDARY_AFTER_NEWLINE = 0, 1, 2, 3

# A text with what byte-level tokenizers could get wrong: no leading space (add_prefix_space would
# add one), runs of spaces, tabs, newlines, accents, CJK, emoji, a special token's spelling.
_PROBE = "def f(x):\n\treturn 'naïve' + \"日本\"  # 😀 <|endoftext|>\r\n\n    \u00a0end "


class NoEndOfTextError(ValueError):
    """A tokenizer with no end-of-text token among the known spellings. Each tool says how to name
    one with its own flag (``naming``); the plain message names no flag."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self.naming())

    def naming(self, how: str | None = None) -> str:
        """The message, telling to name the tokenizer's end-of-text token with ``how`` (a flag)."""
        advice = f"name it with {how}" if how else "name the one it has as the special token eod"
        return f"{self.path}: no end-of-text token among {list(SPELLINGS['eod'])}; {advice}"


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-to-unicode alphabet, reversed: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for U+0100 onwards, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def is_hf_tokenizer_path(path: str | os.PathLike) -> bool:
    """A directory holding ``tokenizer.json``, or a file that is JSON (its first byte is ``{``)."""
    p = Path(path)
    if p.is_dir():
        return (p / "tokenizer.json").is_file()
    try:
        with open(p, "rb") as f:
            return f.read(64).lstrip()[:1] == b"{"
    except OSError:
        return False


def _boundary_rule(spec: dict) -> int:
    """Which csrc/fim.cpp boundary rule is exact for this tokenizer.json (BOUNDARY_NONE when unsure)."""
    if (spec.get("normalizer") or {}).get("type") not in (None, "NFC"):
        return BOUNDARY_NONE
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        kind = part.get("type")
        if kind == "ByteLevel":
            if part.get("add_prefix_space"):
                return BOUNDARY_NONE
        elif kind == "Digits":
            continue
        elif kind == "Split":
            if (part.get("pattern") or {}).get("Regex") not in SPACE_SAFE_REGEXES or part.get("invert"):
                return BOUNDARY_NONE
            if part.get("behavior") not in ("Isolated", "Removed"):
                return BOUNDARY_NONE
        else:
            return BOUNDARY_NONE
    if not parts:
        return BOUNDARY_NONE
    first = parts[0]
    if (first.get("type") == "Split" and first.get("behavior") == "Isolated"
            and first["pattern"]["Regex"] in SPACE_SAFE_REGEXES[1:]):
        return BOUNDARY_AFTER_NEWLINE
    return BOUNDARY_ASCII_SPACE


class HFTokenizer:
    """A byte-level BPE ``tokenizer.json``: the interface of ``megafim.data.tokenizer.Tokenizer``.

    ``special_tokens`` names the spelling of any of ``eod``, ``fim_prefix``, ``fim_middle``,
    ``fim_suffix``, ``fim_pad``, ``repo_name``, ``file_sep`` (else the known spellings are looked up).
    End-of-text is required; a FIM or repository id is ``None`` when the tokenizer has no such token
    (``require_fim`` / ``require_repo_tokens`` say how to add them).
    """

    backend = "huggingface"
    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, model_path: str, json_text: str, special_tokens: dict[str, str] | None = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.model_path = model_path
        self._json_text = json_text  # for pickling: DataLoader workers get the tokenizer, not a path
        self._special_tokens = dict(special_tokens or {})
        try:
            spec = json.loads(json_text)
            self._hf = RustTokenizer.from_str(json_text)
        except Exception as err:  # tokenizers raises its own Exception subclass
            raise ValueError(f"{model_path}: not a Hugging Face tokenizer.json ({err})") from None
        if (spec.get("model") or {}).get("type") != "BPE" or not self._byte_level(spec):
            raise ValueError(f"{model_path}: only byte-level BPE tokenizers are supported "
                             "(model BPE with a ByteLevel pre-tokenizer or decoder, as Llama 3 / Qwen2 / StarCoder)")
        # Text that spells a special token is encoded as text: documents cannot inject control ids.
        # The library is ~1.7x slower in that mode, so texts that spell no special token (nearly all)
        # go to a second instance in the default mode, which gives them the same ids.
        self._byte_bpe = False  # not built yet (_native_encoder)
        self._hf.encode_special_tokens = True
        self._hf_plain = RustTokenizer.from_str(json_text)
        self._added = self._hf.get_added_tokens_decoder()
        specials = sorted((t.content for t in self._added.values() if t.special), key=len, reverse=True)
        self._spells_special = re.compile("|".join(map(re.escape, specials))).search if specials else None
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self._ids = vocab
        self.vocab_size: int = max(vocab.values()) + 1
        self.token_bytes: list[bytes] = self._make_token_bytes()
        self._decode_table = [b if b or i not in self._added else self._added[i].content.encode()
                              for i, b in enumerate(self.token_bytes)]
        self._set_special_ids()
        self.fim_boundaries = _boundary_rule(spec)
        normalizer = self._hf.normalizer
        expected = normalizer.normalize_str(_PROBE) if normalizer is not None else _PROBE
        if self.decode(self.encode(_PROBE)) != expected:
            raise ValueError(f"{model_path}: the tokenizer does not give texts back as they were "
                             "(e.g. ByteLevel add_prefix_space); megafim needs a lossless tokenizer")

    @classmethod
    def from_file(cls, path: str | os.PathLike, special_tokens: dict[str, str] | None = None) -> "HFTokenizer":
        """Load ``tokenizer.json``, or the ``tokenizer.json`` inside a directory."""
        p, text = _read_tokenizer_json(path)
        return cls(str(p), text, special_tokens)

    # -- set-up ------------------------------------------------------------------------------------

    @staticmethod
    def _byte_level(spec: dict) -> bool:
        def has(node) -> bool:
            if not node:
                return False
            if node.get("type") == "ByteLevel":
                return True
            return any(has(n) for n in node.get("pretokenizers", node.get("decoders", [])) or [])
        return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))

    def _make_token_bytes(self) -> list[bytes]:
        """The bytes each id decodes to: its token mapped back through the byte alphabet; an added
        non-special token is its own text; special tokens and unused ids have no bytes."""
        u2b = unicode_to_byte()
        out = [b""] * self.vocab_size
        for token, i in self._ids.items():
            added = self._added.get(i)
            if added is not None:
                out[i] = b"" if added.special else added.content.encode("utf-8")
            elif all(c in u2b for c in token):
                out[i] = bytes(u2b[c] for c in token)
            else:
                raise ValueError(f"{self.model_path}: token {token!r} (id {i}) is not written in the "
                                 "byte-level alphabet")
        return out

    def byte_bpe_spec(self) -> tuple | None:
        """The model of megafim's C++ encoder for ASCII text (``csrc/byte_bpe.h``, exact there), or None
        when this tokenizer does something it does not reproduce (``megafim/data/byte_bpe.py``)."""
        from megafim.data.byte_bpe import byte_bpe_spec

        return byte_bpe_spec(json.loads(self._json_text), unicode_to_byte())

    def token_id(self, spelling: str) -> int | None:
        """The id of a token spelled ``spelling`` exactly, or None."""
        return self._ids.get(spelling)

    def _set_special_ids(self) -> None:
        unknown = set(self._special_tokens) - set(SPELLINGS)
        if unknown:
            raise ValueError(f"special tokens {sorted(unknown)}: expected names among {list(SPELLINGS)}")
        self.special_pieces: dict[str, str | None] = {}
        for name, spellings in SPELLINGS.items():
            named = self._special_tokens.get(name)
            if named is not None:
                if self.token_id(named) is None:
                    raise ValueError(f"{self.model_path}: no token {named!r} (named as {name})")
                spellings = (named,)
            spelling = next((s for s in spellings if self.token_id(s) is not None), None)
            self.special_pieces[name] = spelling
            setattr(self, name, None if spelling is None else self.token_id(spelling))
        if self.eod is None:
            raise NoEndOfTextError(self.model_path)

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added, and a special token's spelling stays text."""
        if not isinstance(text, str):
            raise TypeError(f"encode: expected str, got {type(text).__name__}")
        return self._encoder(text).encode(text, add_special_tokens=False).ids

    def _encoder(self, text: str):
        return self._hf if self._spells_special is not None and self._spells_special(text) else self._hf_plain

    def _encode_many(self, texts: list[str]) -> list:
        """The library's Encodings of ``texts``, in one batch call per mode."""
        special = [i for i, t in enumerate(texts) if self._spells_special and self._spells_special(t)]
        if not special:
            return self._hf_plain.encode_batch_fast(texts, add_special_tokens=False)
        out: list = [None] * len(texts)
        plain = sorted(set(range(len(texts))) - set(special))
        for indices, rust in ((plain, self._hf_plain), (special, self._hf)):
            for i, e in zip(indices, rust.encode_batch_fast([texts[i] for i in indices], add_special_tokens=False)):
                out[i] = e
        return out

    def _native_encoder(self):
        """megafim's C++ encoder for ASCII texts (``byte_bpe_spec``), built at first use; None when this
        tokenizer has none."""
        if self._byte_bpe is False:
            spec = self.byte_bpe_spec()
            self._byte_bpe = None if spec is None else _load_native("byte_bpe").ByteBpe(spec)
        return self._byte_bpe

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids, int32; ids per text, int64): ASCII texts in C++, the others in the library."""
        native = self._native_encoder()
        if native is None:
            encodings = self._encode_many(texts)
            lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
            return np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32,
                               count=int(lengths.sum())), lengths
        flat, lengths, declined = native.encode_flat(texts)
        if not declined.any():
            return flat, lengths
        rest = np.flatnonzero(declined).tolist()
        parts = np.split(flat, np.cumsum(lengths)[:-1])
        for i, e in zip(rest, self._encode_many([texts[i] for i in rest])):
            parts[i] = np.asarray(e.ids, dtype=np.int32)
            lengths[i] = len(e.ids)
        return np.concatenate(parts) if parts else flat, lengths

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[np.ndarray]:
        """``encode`` of each text as an int32 array, in the library's thread pool (its size is set
        by ``RAYON_NUM_THREADS``; ``num_threads`` is accepted for the interface)."""
        if num_threads < 0:
            raise ValueError(f"num_threads {num_threads}: must be >= 0")
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"encode_batch: expected str, got {type(bad).__name__}")
        flat, lengths = self._encode_flat(list(texts))
        return np.split(flat, np.cumsum(lengths)[:-1]) if len(texts) else []

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, in one call: FIM re-encodes a piece's few texts with it."""
        return [e.ids for e in self._encode_many(texts)]

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts encoded: (every id, int32, concatenated; the number of ids per text, int64).
        The preprocessing pipeline's batch encoder: ASCII texts are encoded by megafim's C++ encoder
        (``csrc/byte_bpe.h``, the library's ids, ~13x faster), the others by the library."""
        return self._encode_flat(list(texts))

    # -- decoding ----------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens appear as their spellings. Bytes that are not valid
        UTF-8 (ids ``encode`` did not make, e.g. half a character) become U+FFFD."""
        return decode_with_table(self._decode_table, ids)

    def id_to_piece(self, i: int) -> str:
        return self._hf.id_to_token(i)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``tokenizer.json`` (exactly the one loaded) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self._json_text, encoding="utf-8")
        return out / "tokenizer.json"

    def __reduce__(self):
        return (HFTokenizer, (self.model_path, self._json_text, self._special_tokens))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _read_tokenizer_json(path: str | os.PathLike) -> tuple[Path, str]:
    """(the file, its text) of ``tokenizer.json`` or of the ``tokenizer.json`` inside a directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r}: no such file (expected tokenizer.json or "
                                "a directory holding it)")
    try:
        return p, p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not a Hugging Face tokenizer.json (not UTF-8 text)") from None
    except OSError as err:
        raise OSError(f"tokenizer {str(p)!r}: cannot read it ({err})") from err


Tokens = dict[str, tuple[str, int]]  # {name: (spelling, id)}


def add_fim_tokens(src: str | os.PathLike, out_dir: str | os.PathLike,
                   spellings: dict[str, str] | None = None,
                   repo_tokens: bool = False) -> tuple[Path, Tokens, Tokens]:
    """Copy the tokenizer at ``src`` (``tokenizer.json`` or a directory) to ``out_dir`` with the FIM
    tokens it lacks added as special tokens (``DEFAULT_FIM_SPELLINGS`` unless ``spellings``), and
    end-of-text too when it has none; with ``repo_tokens`` also ``<repo_name>`` / ``<file_sep>``
    (repository-level documents). A token is there already when the tokenizer has its spelling in
    ``spellings``, or one of its known ``SPELLINGS``. Returns (the new tokenizer.json, the tokens
    added, the tokens already there), the latter two as {name: (spelling, id)}.

    New tokens get ids after the last one, so the vocabulary grows: a model imported with this
    tokenizer needs its embedding (and output) matrices resized to the new ``vocab_size`` (new rows:
    e.g. the mean of the existing rows), which the model import does.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    src_path = Path(src)
    json_path, text = _read_tokenizer_json(src_path)
    try:
        rust = RustTokenizer.from_str(text)
    except Exception as err:  # tokenizers raises its own Exception subclass
        raise ValueError(f"{json_path}: not a Hugging Face tokenizer.json ({err})") from None
    spellings = {**DEFAULT_FIM_SPELLINGS, "eod": "<|endoftext|>", "repo_name": SPELLINGS["repo_name"][0],
                 "file_sep": SPELLINGS["file_sep"][0], **(spellings or {})}
    names = ("eod", *FIM_NAMES, *(("repo_name", "file_sep") if repo_tokens else ()))
    vocab = rust.get_vocab(with_added_tokens=True)
    added, present = {}, {}
    for name in names:
        have = next((s for s in (spellings[name], *SPELLINGS[name]) if s in vocab), None)
        if have is not None:
            present[name] = (have, vocab[have])
            continue
        rust.add_special_tokens([AddedToken(spellings[name], special=True, normalized=False)])
        added[name] = (spellings[name], rust.token_to_id(spellings[name]))
    # The result must load as megafim loads it, its unknown spellings named; checked before writing.
    chosen = {**present, **added}
    HFTokenizer(str(json_path), rust.to_str(),
                {name: spelling for name, (spelling, _) in chosen.items() if spelling not in SPELLINGS[name]})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if src_path.is_dir():  # the rest of a transformers directory goes along
        for f in src_path.iterdir():
            if f.is_file() and f.name != "tokenizer.json":
                (out / f.name).write_bytes(f.read_bytes())
    rust.save(str(out / "tokenizer.json"))
    _add_to_tokenizer_config(out / "tokenizer_config.json", [spelling for spelling, _ in added.values()])
    return out / "tokenizer.json", added, present


def _add_to_tokenizer_config(path: Path, tokens: list[str]) -> None:
    """List the new tokens in a transformers ``tokenizer_config.json``, if there is one."""
    if not path.is_file() or not tokens:
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    extra = list(config.get("additional_special_tokens") or [])
    config["additional_special_tokens"] = extra + [t for t in tokens if t not in extra]
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
