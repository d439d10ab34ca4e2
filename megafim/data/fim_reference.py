"""The slow, obviously-correct definition of context-level fill-in-the-middle (docs/fim.md).

Everything here is plain Python and written to be read, not to be fast: each FIM piece is decoded to
text, cut at two character positions, and its prefix, middle and suffix are encoded separately. The
C++ fast path (``csrc/fim.cpp``, used by ``megafim.data.fim.FimTransform``) must give exactly the same
tokens and masks; ``tests/data/test_fim_equality.py`` checks that with hypothesis.

The tokenizer is anything with ``token_bytes``, ``encode(str) -> list[int]`` and the special ids
``eod``, ``fim_prefix``, ``fim_middle``, ``fim_suffix``, ``fim_pad`` (``megafim.data.tokenizer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15

# Piece modes, in the order the native code numbers them.
MODES = ("ar", "psm", "spm")

# Draw numbers within one piece's stream (splitmix64 counter).
DRAW_FIM, DRAW_SPM, DRAW_CUT_A, DRAW_CUT_B = 0, 1, 2, 3


def splitmix64(x: int) -> int:
    """One step of splitmix64: a bijective 64-bit mixer (Steele, Lea, Flood 2014)."""
    z = (x + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def piece_key(seed: int, epoch: int, index: int, piece: int) -> int:
    """The RNG key of one piece: a hash chain of (seed, epoch, sample index, piece number)."""
    h = splitmix64(seed & MASK64)
    h = splitmix64(h ^ (epoch & MASK64))
    h = splitmix64(h ^ (index & MASK64))
    return splitmix64(h ^ (piece & MASK64))


def file_key(key: int, file: int) -> int:
    """The RNG key of file ``file`` of a piece split on the split token (``piece_key`` is ``key``).

    The first file keeps the piece's own key, so a document without the split token is transformed
    exactly as without the option; every later file gets a key of its own from the chain."""
    return key if file == 0 else splitmix64(key ^ (file & MASK64))


def draw(key: int, k: int) -> int:
    """The k-th 64-bit draw of a piece's counter-based stream."""
    return splitmix64((key + k * GOLDEN) & MASK64)


def uniform(r: int) -> float:
    """A draw as a float in [0, 1): the top 53 bits, exactly representable as a double."""
    return (r >> 11) * (2.0**-53)


def below(r: int, n: int) -> int:
    """A draw as an integer in [0, n): multiply-high (bias < n / 2**64, negligible)."""
    return (r * n) >> 64


@dataclass
class PieceDecision:
    mode: str  # "ar", "psm" or "spm"
    cut_a: int = 0  # character positions, cut_a <= cut_b
    cut_b: int = 0


def decide(key: int, n_chars: int, rate: float, spm_rate: float) -> PieceDecision:
    """FIM or not, SPM or PSM, and two sorted cut points uniform over [0, n_chars]."""
    if n_chars == 0 or not uniform(draw(key, DRAW_FIM)) < rate:
        return PieceDecision("ar")
    mode = "spm" if uniform(draw(key, DRAW_SPM)) < spm_rate else "psm"
    a = below(draw(key, DRAW_CUT_A), n_chars + 1)
    b = below(draw(key, DRAW_CUT_B), n_chars + 1)
    return PieceDecision(mode, min(a, b), max(a, b))


# ----------------------------------------------------------------------------------------------
# The edges of a piece: partial characters cut by the context boundary
# ----------------------------------------------------------------------------------------------


def _single_byte(token_bytes: list[bytes], t: int) -> int | None:
    b = token_bytes[t]
    return b[0] if len(b) == 1 else None


def _utf8_len(lead: int) -> int:
    """Length of the sequence a lead byte announces (0 for a continuation or an invalid byte)."""
    if lead < 0x80:
        return 1
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    if 0xF0 <= lead < 0xF8:
        return 4
    return 0


def split_edges(piece: list[int], token_bytes: list[bytes]) -> tuple[int, int]:
    """Numbers of leading and trailing tokens that are bytes of a character cut by the context edge.

    Only byte-fallback tokens (one byte >= 0x80) can hold part of a character. Leading: the run of
    continuation bytes (0x80-0xBF) at the start. Trailing: a lead byte followed by fewer
    continuation bytes than it announces, at the end.
    """
    n = len(piece)
    lead = 0
    while lead < n and (b := _single_byte(token_bytes, piece[lead])) is not None and 0x80 <= b < 0xC0:
        lead += 1
    j, conts = n, 0
    while conts < 3 and j > lead and (b := _single_byte(token_bytes, piece[j - 1])) is not None and 0x80 <= b < 0xC0:
        j -= 1
        conts += 1
    trail = 0
    if j > lead and (b := _single_byte(token_bytes, piece[j - 1])) is not None and _utf8_len(b) > conts + 1:
        trail = conts + 1
    return lead, trail


def piece_text(core: list[int], token_bytes: list[bytes]) -> str | None:
    """The text of a piece's core, or None when it cannot take part in FIM.

    None when a token has no bytes (a special token other than end-of-text) or the bytes are not
    valid UTF-8 (no document the tokenizer encoded can give that; a corrupt dataset can).
    """
    if any(len(token_bytes[t]) == 0 for t in core):
        return None
    try:
        return b"".join(token_bytes[t] for t in core).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return None


# ----------------------------------------------------------------------------------------------
# One piece
# ----------------------------------------------------------------------------------------------


@dataclass
class PieceOutput:
    tokens: list[int]
    kinds: list[int]  # per token: KIND_TEXT, KIND_MIDDLE, KIND_SENTINEL or KIND_PAD
    mode: str


KIND_TEXT, KIND_MIDDLE, KIND_SENTINEL, KIND_PAD = 0, 1, 2, 3


def transform_piece(piece: list[int], key: int, tok, rate: float, spm_rate: float,
                    keep_length: bool = False) -> PieceOutput:
    """Decode, cut, encode prefix / middle / suffix separately, assemble PSM or SPM.

    Leading partial-character bytes stay before the first sentinel, trailing ones stay right after
    the suffix (the text they follow in the document). ``keep_length`` (document-level FIM): the
    piece keeps its token count; the suffix (with those trailing bytes) loses tokens at its end or
    is followed by ``fim_pad``; a piece whose suffix is too short to absorb the growth stays as is.
    """
    unchanged = PieceOutput(list(piece), [KIND_TEXT] * len(piece), "ar")
    lead, trail = split_edges(piece, tok.token_bytes)
    core = piece[lead:len(piece) - trail]
    text = piece_text(core, tok.token_bytes)
    if text is None:
        return unchanged
    d = decide(key, len(text), rate, spm_rate)
    if d.mode == "ar":
        return unchanged
    prefix = list(tok.encode(text[:d.cut_a]))
    middle = list(tok.encode(text[d.cut_a:d.cut_b]))
    suffix = list(tok.encode(text[d.cut_b:])) + list(piece[len(piece) - trail:])
    suffix_kinds = [KIND_TEXT] * len(suffix)
    if keep_length:
        excess = lead + 3 + len(prefix) + len(middle) + len(suffix) - len(piece)
        if excess > len(suffix):
            return unchanged
        if excess > 0:
            suffix, suffix_kinds = suffix[:len(suffix) - excess], suffix_kinds[:len(suffix) - excess]
        else:
            suffix += [tok.fim_pad] * -excess
            suffix_kinds += [KIND_PAD] * -excess
    head = list(piece[:lead])
    S = KIND_SENTINEL
    if d.mode == "psm":
        tokens = head + [tok.fim_prefix] + prefix + [tok.fim_suffix] + suffix + [tok.fim_middle] + middle
        kinds = ([KIND_TEXT] * lead + [S] + [KIND_TEXT] * len(prefix) + [S] + suffix_kinds + [S]
                 + [KIND_MIDDLE] * len(middle))
    else:
        tokens = head + [tok.fim_prefix, tok.fim_suffix] + suffix + [tok.fim_middle] + prefix + middle
        kinds = ([KIND_TEXT] * lead + [S, S] + suffix_kinds + [S] + [KIND_TEXT] * len(prefix)
                 + [KIND_MIDDLE] * len(middle))
    return PieceOutput(tokens, kinds, d.mode)


# ----------------------------------------------------------------------------------------------
# One context
# ----------------------------------------------------------------------------------------------


@dataclass
class ReferenceResult:
    tokens: np.ndarray
    loss_mask: np.ndarray
    middle_mask: np.ndarray
    modes: list[str] = field(default_factory=list)


def split_pieces(context: list[int], eod: int) -> list[list[int]]:
    """The pieces between end-of-text tokens: k end-of-text tokens give k + 1 (maybe empty) pieces
    (also the files between split tokens: ``eod`` is then the split token)."""
    pieces, cur = [], []
    for t in context:
        if t == eod:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    return pieces


def transform_context(context, tok, *, seed: int, epoch: int, index: int, rate: float,
                      spm_rate: float, level: str = "context", mask_sentinels: bool = False,
                      split_token: int | None = None) -> ReferenceResult:
    """Context-level (or document-level) FIM of one context; exactly ``len(context)`` tokens out.

    Context level: pieces are transformed, joined with end-of-text, then the tail is cut off or
    ``fim_pad`` is appended. Document level: every piece keeps its own length (see transform_piece).
    ``split_token`` (FIM per file): each piece is split again on that id, every file between two of
    them is transformed on its own with ``file_key`` (files in order), and the split tokens stay where
    they were; ``modes`` then has one entry per file.
    """
    context = [int(t) for t in context]
    length = len(context)
    tokens: list[int] = []
    kinds: list[int] = []
    modes: list[str] = []
    for i, piece in enumerate(split_pieces(context, tok.eod)):
        if i > 0:
            tokens.append(tok.eod)
            kinds.append(KIND_TEXT)
        key = piece_key(seed, epoch, index, i)
        files = [piece] if split_token is None else split_pieces(piece, split_token)
        for j, file in enumerate(files):
            if j > 0:
                tokens.append(split_token)
                kinds.append(KIND_TEXT)
            out = transform_piece(file, file_key(key, j), tok, rate, spm_rate, keep_length=(level == "document"))
            tokens += out.tokens
            kinds += out.kinds
            modes.append(out.mode)
    tokens, kinds = tokens[:length], kinds[:length]
    kinds += [KIND_PAD] * (length - len(tokens))
    tokens += [tok.fim_pad] * (length - len(tokens))
    kinds_arr = np.asarray(kinds, dtype=np.int8)
    loss = (kinds_arr != KIND_PAD) & ~(mask_sentinels & (kinds_arr == KIND_SENTINEL))
    return ReferenceResult(np.asarray(tokens, dtype=np.int64), loss.astype(np.float32),
                           kinds_arr == KIND_MIDDLE, modes)


# ----------------------------------------------------------------------------------------------
# Undoing the transform
# ----------------------------------------------------------------------------------------------


def unpermute_piece(piece: list[int], tok) -> bytes:
    """The original bytes of one piece from its FIM form (identity for a piece that is not FIM).

    PSM ``lead <PRE> p <SUF> s <MID> m`` and SPM ``lead <PRE><SUF> s <MID> p m`` both give
    ``lead + p + m + s``. A piece whose tail was cut off by the context end gives what is left of
    that order. Padding is dropped.
    """
    tb = tok.token_bytes
    text = lambda ts: b"".join(tb[t] for t in ts if t != tok.fim_pad)  # noqa: E731
    if tok.fim_prefix not in piece:
        return text(piece)
    p = piece.index(tok.fim_prefix)
    lead, rest = piece[:p], piece[p + 1:]
    spm = bool(rest) and rest[0] == tok.fim_suffix
    if spm:
        rest = rest[1:]
        m = rest.index(tok.fim_middle) if tok.fim_middle in rest else len(rest)
        return text(lead) + text(rest[m + 1:]) + text(rest[:m])
    s = rest.index(tok.fim_suffix) if tok.fim_suffix in rest else len(rest)
    prefix, rest = rest[:s], rest[s + 1:]
    m = rest.index(tok.fim_middle) if tok.fim_middle in rest else len(rest)
    return text(lead) + text(prefix) + text(rest[m + 1:]) + text(rest[:m])


def unpermute(tokens, tok, split_token: int | None = None) -> list[bytes]:
    """The original bytes of every piece of a transformed context (see unpermute_piece); with
    ``split_token``, of every file (the pieces split again on it, as transform_context does)."""
    pieces = split_pieces([int(t) for t in tokens], tok.eod)
    if split_token is not None:
        pieces = [f for p in pieces for f in split_pieces(p, split_token)]
    return [unpermute_piece(p, tok) for p in pieces]
