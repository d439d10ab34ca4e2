"""megafim's tokenizers: one interface, two backends, chosen by ``load_tokenizer``.

``load_tokenizer(path, tokenizer_type=None)`` gives a ``Tokenizer`` (``GPTSentencePieceTokenizer``: a
sentencepiece BPE model trained by ``tools/train_tokenizer.py``) or an ``HFTokenizer``
(``HuggingFaceTokenizer``: a byte-level BPE ``tokenizer.json``, ``megafim/data/tokenizer_hf.py``). Both
have ``encode``, ``encode_batch``, ``decode``, ``vocab_size``, ``token_bytes``, ``eod`` and the FIM ids.

``Tokenizer.from_file(path)`` loads a sentencepiece model (and hands a tokenizer.json to the loader). Encoding runs in
the C++ encoder (``csrc/bpe.h``, module ``megafim._native.bpe_tokenizer``) when it is built, and in
sentencepiece otherwise; both give the same ids. One deliberate difference from plain sentencepiece:
a literal U+2581 ("▁", which sentencepiece uses for a space and would decode as one) is always
encoded as its three UTF-8 bytes, so that ``decode(encode(text)) == text`` for every string.
See docs/tokenizer.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

log = logging.getLogger(__name__)

EOD_PIECE = "<|endoftext|>"
FIM_PREFIX_PIECE = "<fim_prefix>"
FIM_MIDDLE_PIECE = "<fim_middle>"
FIM_SUFFIX_PIECE = "<fim_suffix>"
FIM_PAD_PIECE = "<fim_pad>"
SPECIAL_PIECES = {"eod": EOD_PIECE, "fim_prefix": FIM_PREFIX_PIECE, "fim_middle": FIM_MIDDLE_PIECE,
                  "fim_suffix": FIM_SUFFIX_PIECE, "fim_pad": FIM_PAD_PIECE}
# Repository-level documents (tools/preprocess_data.py --group-by-key), StarCoder2's spellings. Optional:
# models trained before they existed lack them, and only grouping needs them (require_repo_tokens).
REPO_NAME_PIECE = "<repo_name>"
FILE_SEP_PIECE = "<file_sep>"
REPO_PIECES = {"repo_name": REPO_NAME_PIECE, "file_sep": FILE_SEP_PIECE}

SPACE_SYMBOL = "\u2581"  # sentencepiece's stand-in for " " inside pieces
SPACE_SYMBOL_BYTES = SPACE_SYMBOL.encode("utf-8")

# sentencepiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------------
# Reading the .model file (a ModelProto). A few fields are enough, so it is read directly from the
# protobuf wire format rather than adding a protobuf dependency.


@dataclass
class ModelProto:
    """The parts of a sentencepiece ModelProto that decide how text is encoded."""

    pieces: list[bytes] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = 1  # 1 UNIGRAM (the proto default), 2 BPE
    byte_fallback: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    treat_whitespace_as_suffix: bool = False


def decode_with_table(table: Sequence[bytes], ids: Iterable[int]) -> str:
    """The text of ``ids``, where ``table[i]`` holds id i's bytes (both tokenizer backends); ids outside
    the table raise naming the first one, bytes that are not valid UTF-8 become U+FFFD."""
    ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
        bad = int(ids[(ids < 0) | (ids >= len(table))][0])
        raise ValueError(f"decode: id {bad} is outside the vocabulary [0, {len(table)})")
    return b"".join([table[i] for i in ids.tolist()]).decode("utf-8", errors="replace")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) for one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield number, wire, value


def parse_model_proto(data: bytes) -> ModelProto:
    m = ModelProto()
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:  # repeated SentencePiece pieces
            piece, score, kind = b"", 0.0, NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = bytes(v)
                elif n == 2 and w == 5:
                    score = float(np.frombuffer(v, dtype="<f4")[0])
                elif n == 3 and w == 0:
                    kind = v
            m.pieces.append(piece)
            m.scores.append(score)
            m.types.append(kind)
        elif number == 2 and wire == 2:  # TrainerSpec
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    m.model_type = v
                elif n == 35 and w == 0:
                    m.byte_fallback = bool(v)
                elif n == 24 and w == 0:
                    m.treat_whitespace_as_suffix = bool(v)
        elif number == 3 and wire == 2:  # NormalizerSpec
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    m.normalizer_name = bytes(v).decode("utf-8", "replace")
                elif n == 2 and w == 2:
                    m.precompiled_charsmap = bytes(v)
                elif n == 3 and w == 0:
                    m.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    m.remove_extra_whitespaces = bool(v)
                elif n == 5 and w == 0:
                    m.escape_whitespaces = bool(v)
    return m


def native_compatible(m: ModelProto) -> str | None:
    """None when the C++ encoder reproduces this model exactly, else the reason it cannot."""
    if m.model_type != 2:
        return "not a BPE model"
    if not m.byte_fallback:
        return "byte fallback is off"
    if m.precompiled_charsmap or m.normalizer_name not in ("identity", ""):
        return f"normalization rule {m.normalizer_name!r} is not the identity"
    if m.add_dummy_prefix or m.remove_extra_whitespaces or not m.escape_whitespaces:
        return "whitespace handling differs from megafim's (dummy prefix / extra-whitespace removal)"
    if m.treat_whitespace_as_suffix:
        return "treat_whitespace_as_suffix is on"
    if USER_DEFINED in m.types:
        return "the model has user-defined symbols"
    return None


def _load_native():
    try:
        from megafim._native import load
        return load("bpe_tokenizer")
    except ImportError as err:
        return err


# ---------------------------------------------------------------------------------------------------
# The loader

TOKENIZER_TYPES = ("GPTSentencePieceTokenizer", "HuggingFaceTokenizer")  # Megatron-LM's names


def load_tokenizer(path: str | os.PathLike, tokenizer_type: str | None = None,
                   special_tokens: dict[str, str] | None = None):
    """The tokenizer at ``path``, with the backend ``tokenizer_type`` names (None: a directory or a
    JSON file is a Hugging Face tokenizer, anything else a sentencepiece model). ``special_tokens``
    names the spellings of ``eod`` / ``fim_*`` tokens of a Hugging Face tokenizer."""
    from megafim.data.tokenizer_hf import HFTokenizer, is_hf_tokenizer_path

    if tokenizer_type not in (None, *TOKENIZER_TYPES):
        raise ValueError(f"tokenizer type {tokenizer_type!r}: expected one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type is None:
        tokenizer_type = TOKENIZER_TYPES[1] if is_hf_tokenizer_path(path) else TOKENIZER_TYPES[0]
    if tokenizer_type == "HuggingFaceTokenizer":
        return HFTokenizer.from_file(path, special_tokens)
    if special_tokens:
        raise ValueError("special token names apply to Hugging Face tokenizers only; a sentencepiece "
                         "model has megafim's fixed special pieces")
    return Tokenizer._from_sentencepiece_file(path)


def require_repo_tokens(tokenizer, flag: str = "--group-by-key") -> None:
    """Raise ValueError (one line, naming ``flag``) unless the tokenizer has ``<repo_name>`` and
    ``<file_sep>``, which repository-level documents are made of."""
    missing = [REPO_PIECES[n] for n in REPO_PIECES if getattr(tokenizer, n, None) is None]
    if missing:
        how = ("add them with tools/add_fim_tokens.py --repo-tokens (and resize the model's embeddings)"
               if tokenizer.tokenizer_type == "HuggingFaceTokenizer" else
               "retrain it with tools/train_tokenizer.py, which adds them")
        raise ValueError(f"{flag}: tokenizer {tokenizer.model_path} has no {' or '.join(missing)} token; {how}")


def require_fim(tokenizer) -> None:
    """Raise ValueError (one line) unless the tokenizer has the four FIM tokens FIM training needs."""
    missing = [n for n in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad") if getattr(tokenizer, n, None) is None]
    if missing:
        raise ValueError(f"tokenizer {tokenizer.model_path}: no {', '.join(missing)} token, needed for FIM rates > 0; "
                         "add them with tools/add_fim_tokens.py (tools/convert_hf_to_checkpoint.py then grows the "
                         "model's embeddings) or name tokens it has with data.special_tokens / --special-token "
                         "NAME=SPELLING")


# ---------------------------------------------------------------------------------------------------


class Tokenizer:
    """A sentencepiece BPE model with megafim's special tokens; see the module docstring."""

    def __init__(self, model_path: str, data: bytes, backend: str = "auto") -> None:
        if backend not in ("auto", "native", "sentencepiece"):
            raise ValueError(f"backend {backend!r}: expected 'auto', 'native' or 'sentencepiece'")
        self.model_path = model_path
        self._model_data = data  # for pickling: DataLoader workers get the model, not a path
        self._requested_backend = backend
        try:
            self._proto = parse_model_proto(data)
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except (ValueError, RuntimeError, OSError) as err:
            raise ValueError(f"{model_path}: not a sentencepiece model file ({err})") from err
        if len(self._proto.pieces) != self._sp.vocab_size():
            raise ValueError(f"{model_path}: not a sentencepiece model file (piece table unreadable)")
        self.vocab_size: int = self._sp.vocab_size()
        self._set_special_ids()
        self.token_bytes: list[bytes] = self._make_token_bytes()
        # decode() renders special and control ids by name
        self._decode_table = [b if b or t not in (CONTROL, UNKNOWN) else p
                              for b, p, t in zip(self.token_bytes, self._proto.pieces, self._proto.types)]
        self._space_symbol_ids = [self._byte_id(b) for b in SPACE_SYMBOL_BYTES]
        self._native = None
        self.backend = "sentencepiece"
        if backend != "sentencepiece":
            self._init_native(required=backend == "native")

    tokenizer_type = "GPTSentencePieceTokenizer"
    fim_boundaries = 1  # tokenizer_hf.BOUNDARY_SPACE: no piece holds a non-space byte followed by a space

    @classmethod
    def from_file(cls, path: str | os.PathLike, backend: str = "auto"):
        """Load ``path`` (a ``.model`` file, or the prefix ``tools/train_tokenizer.py`` was given).

        A Hugging Face ``tokenizer.json`` (or a directory holding one) is handed to ``load_tokenizer``,
        so that every caller of ``from_file`` takes both kinds."""
        from megafim.data.tokenizer_hf import is_hf_tokenizer_path

        if backend == "auto" and is_hf_tokenizer_path(path):
            return load_tokenizer(path, "HuggingFaceTokenizer")
        return cls._from_sentencepiece_file(path, backend)

    @classmethod
    def _from_sentencepiece_file(cls, path: str | os.PathLike, backend: str = "auto") -> "Tokenizer":
        p = Path(path)
        if not p.exists() and Path(f"{p}.model").is_file():
            p = Path(f"{p}.model")
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer model {str(path)!r}: no such file")
        try:
            data = p.read_bytes()
        except OSError as err:
            raise OSError(f"tokenizer model {str(p)!r}: cannot read it ({err})") from err
        return cls(str(p), data, backend=backend)

    # -- set-up ------------------------------------------------------------------------------------

    def _set_special_ids(self) -> None:
        missing = []
        for attr, piece in SPECIAL_PIECES.items():
            i = self._sp.piece_to_id(piece)
            if self._sp.id_to_piece(i) != piece or self._proto.types[i] != CONTROL:
                missing.append(piece)
            setattr(self, attr, i)
        self.special_pieces: dict[str, str | None] = dict(SPECIAL_PIECES)
        for attr, piece in REPO_PIECES.items():  # optional: None in models trained before they existed
            i = self._sp.piece_to_id(piece)
            present = self._sp.id_to_piece(i) == piece and self._proto.types[i] == CONTROL
            setattr(self, attr, i if present else None)
            self.special_pieces[attr] = piece if present else None
        if missing:
            raise ValueError(f"{self.model_path}: the model lacks the special tokens {', '.join(missing)} "
                             "(as control symbols); train it with tools/train_tokenizer.py")
        if not self._proto.byte_fallback:
            raise ValueError(f"{self.model_path}: the model was trained without byte fallback, so it "
                             "cannot encode every text losslessly; train it with tools/train_tokenizer.py")
        missing_bytes = [b for b in range(256) if self._byte_id(b) is None]
        if missing_bytes:
            raise ValueError(f"{self.model_path}: byte-fallback pieces missing, e.g. <0x{missing_bytes[0]:02X}>")

    def _byte_id(self, b: int) -> int | None:
        i = self._sp.piece_to_id(f"<0x{b:02X}>")
        return i if self._proto.types[i] == BYTE else None

    def _make_token_bytes(self) -> list[bytes]:
        out = []
        for piece, kind in zip(self._proto.pieces, self._proto.types):
            if kind == BYTE:
                out.append(bytes([int(piece[3:5], 16)]))  # "<0xAB>"
            elif kind in (NORMAL, USER_DEFINED, UNUSED):
                out.append(piece.replace(SPACE_SYMBOL_BYTES, b" "))
            else:
                out.append(b"")
        return out

    def _init_native(self, required: bool) -> None:
        reason = native_compatible(self._proto)
        module = _load_native() if reason is None else None
        if isinstance(module, ImportError):
            reason = str(module)
        if reason is not None:
            if required:
                raise ValueError(f"{self.model_path}: the C++ encoder cannot be used: {reason}")
            log.warning("tokenizer %s: encoding with sentencepiece (%s)", self.model_path, reason)
            return
        self._native = module.Encoder(*self.model_spec())
        self.backend = "native"

    def model_spec(self) -> tuple[list[bytes], list[float], list[int]]:
        """(pieces, scores, sentencepiece piece types) for the C++ ``megafim::BpeEncoder``."""
        reason = native_compatible(self._proto)
        if reason is not None:
            raise ValueError(f"{self.model_path}: the C++ encoder cannot reproduce this model: {reason}")
        return list(self._proto.pieces), list(self._proto.scores), list(self._proto.types)

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never a special id. ``decode`` gives ``text`` back exactly."""
        if self._native is not None:
            return self._native.encode(text)
        return self.encode_reference(text)

    def encode_reference(self, text: str) -> list[int]:
        """The definition of ``encode``: sentencepiece on the text between literal U+2581s, which are
        encoded as their UTF-8 bytes."""
        if not isinstance(text, str):
            raise TypeError(f"encode: expected str, got {type(text).__name__}")
        if SPACE_SYMBOL not in text:
            return self._sp.encode(text) if text else []
        out: list[int] = []
        for i, part in enumerate(text.split(SPACE_SYMBOL)):
            if i:
                out.extend(self._space_symbol_ids)
            if part:
                out.extend(self._sp.encode(part))
        return out

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[np.ndarray]:
        """``encode`` of each text as an int32 array, on ``num_threads`` threads (0: all cores)."""
        if num_threads < 0:
            raise ValueError(f"num_threads {num_threads}: must be >= 0")
        if self._native is not None:
            return self._native.encode_batch(list(texts), num_threads)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"encode_batch: expected str, got {type(bad).__name__}")
        plain = [t for t in texts if SPACE_SYMBOL not in t]
        encoded = iter(self._sp.encode(plain, num_threads=num_threads or (os.cpu_count() or 1)) if plain else [])
        return [np.asarray(next(encoded) if SPACE_SYMBOL not in t else self.encode_reference(t), dtype=np.int32)
                for t in texts]

    # -- decoding ----------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens appear as their names, e.g. ``<fim_prefix>``. Bytes that do
        not form valid UTF-8 (only possible for ids that ``encode`` did not make) become U+FFFD."""
        return decode_with_table(self._decode_table, ids)

    def token_id(self, spelling: str) -> int | None:
        """The id of the piece spelled ``spelling`` exactly, or None (as HFTokenizer.token_id)."""
        i = self._sp.piece_to_id(spelling)
        return i if self._sp.id_to_piece(i) == spelling else None

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def __reduce__(self):
        return (Tokenizer, (self.model_path, self._model_data, self._requested_backend))

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, backend={self.backend!r})"
