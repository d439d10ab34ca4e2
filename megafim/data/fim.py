"""Context-level fill-in-the-middle at load time (Bavarian et al. 2022; docs/fim.md).

``FimTransform`` is a pure function of (context, seed, epoch, sample index): the same sample comes out
of any DataLoader worker, any data-parallel layout and after any resume. The work is done in C++
(``csrc/fim.cpp``) with exactly the semantics of the slow definition in ``fim_reference.py``;
``unpermute`` undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megafim._native import load as _load_native
from megafim.data import fim_reference as _ref
from megafim.data.tokenizer import require_fim

LEVELS = ("context", "document")
_MASK64 = _ref.MASK64
_MODES = _ref.MODES


@dataclass(frozen=True)
class FimConfig:
    """How samples are turned into fill-in-the-middle examples."""

    rate: float = 0.5
    """Probability that a piece (a document, or what of it is in the context) becomes FIM."""
    spm_rate: float = 0.5
    """Probability that a FIM piece uses SPM (``<PRE><SUF> suffix <MID> prefix middle``), else PSM."""
    level: str = "context"
    """``context``: pieces are joined again and the context's tail is cut off or padded.
    ``document``: every piece keeps its own token count (its suffix absorbs the difference)."""
    mask_sentinels: bool = False
    """Leave the sentinel tokens out of the loss (end-of-text is always trained on)."""
    split_token: str | None = None
    """FIM per file: the token (as the tokenizer spells it, e.g. ``<file_sep>``) that separates the
    files of a repository-level document. Each file between two of them is a piece of its own: its
    own FIM decision, mode and cuts; the split tokens stay in place. None: whole documents."""

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"FimConfig.{name} must be a number in [0, 1], got {value!r}")
        if self.level not in LEVELS:
            raise ValueError(f"FimConfig.level must be one of {LEVELS}, got {self.level!r}")
        if not isinstance(self.mask_sentinels, bool):
            raise ValueError(f"FimConfig.mask_sentinels must be a bool, got {self.mask_sentinels!r}")
        if self.split_token is not None and (not isinstance(self.split_token, str) or not self.split_token):
            raise ValueError(f"FimConfig.split_token must be a token's spelling or None, got {self.split_token!r}")


def split_token_id(config: FimConfig, tokenizer) -> int | None:
    """The id of ``config.split_token`` in ``tokenizer`` (None when unset); ValueError (one line, naming
    ``FimConfig.split_token``) when the tokenizer lacks it or it is end-of-text or a FIM token."""
    if config.split_token is None:
        return None
    i = tokenizer.token_id(config.split_token)
    if i is None:
        raise ValueError(f"FimConfig.split_token {config.split_token!r}: tokenizer {tokenizer.model_path} has no "
                         "such token (repository-level tokenizers: tools/train_tokenizer.py)")
    taken = [n for n in ("eod", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad")
             if getattr(tokenizer, n, None) == i]
    if taken:
        raise ValueError(f"FimConfig.split_token {config.split_token!r} is the tokenizer's {taken[0]} token; "
                         "name the token that separates files")
    return i


@dataclass(slots=True)
class FimResult:
    tokens: np.ndarray
    """int64, the same length as the context (``seq_length + 1``)."""
    loss_mask: np.ndarray
    """float32 per token, as a target: 0 for padding (and sentinels if masked), 1 otherwise."""
    middle_mask: np.ndarray
    """bool per token: the token belongs to the middle of a FIM piece."""
    modes: list[str]
    """Per end-of-text-separated piece of the input context (per file of it with a split token):
    "ar", "psm" or "spm"."""


class FimTransform:
    """``FimTransform(config, tokenizer)(context, seed=, epoch=, index=) -> FimResult``.

    The tokenizer needs ``token_bytes``, ``encode`` and the ids ``eod``, ``fim_prefix``,
    ``fim_middle``, ``fim_suffix``, ``fim_pad``. When it encodes with the C++ encoder
    (``backend == "native"``), re-encoding runs in C++ without the GIL on the same model
    (``model_spec()``); otherwise the C++ code calls ``tokenizer.encode`` for the words it re-encodes,
    re-encoding up to the token boundaries the tokenizer's ``fim_boundaries`` rule vouches for (a
    Hugging Face byte-level BPE tokenizer: docs/fim.md), and a tokenizer with ``byte_bpe_spec()``
    has its ASCII texts encoded in C++ (``byte_bpe``: csrc/byte_bpe.h, the same ids). A rate > 0 needs
    the four FIM tokens (``require_fim``: one-line ValueError), and a ``split_token`` the tokenizer has
    (``split_token_id``).

    ``sample(context, seed, epoch, index) -> (tokens, loss_mask, middle_mask)`` is the same transform
    without the modes, for ``GPTDataset.__getitem__``: one native call, arguments by position,
    ``seed``/``epoch``/``index`` in [0, 2**64), ``context`` any integer numpy array (the dataset's own
    dtype is fine).
    """

    def __init__(self, config: FimConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        if config.rate > 0:
            require_fim(tokenizer)
        self.split_id = split_token_id(config, tokenizer)
        native = _load_native("fim")
        ids = dict(eod=tokenizer.eod, fim_prefix=tokenizer.fim_prefix, fim_middle=tokenizer.fim_middle,
                   fim_suffix=tokenizer.fim_suffix, fim_pad=tokenizer.fim_pad)
        token_bytes = list(tokenizer.token_bytes)
        if getattr(native, "has_native_encoder", False) and getattr(tokenizer, "backend", None) == "native":
            pieces, scores, types = tokenizer.model_spec()
            self._native = native.Fim.with_model_spec(token_bytes, **ids, pieces=list(pieces),
                                                      scores=list(scores), types=list(types))
            self.native_encoder = True
            self.byte_bpe = False
        else:
            byte_bpe = tokenizer.byte_bpe_spec() if hasattr(tokenizer, "byte_bpe_spec") else None
            self._native = native.Fim.with_callable(token_bytes, **ids, encode=tokenizer.encode,
                                                    boundaries=getattr(tokenizer, "fim_boundaries", 1),
                                                    encode_batch=getattr(tokenizer, "encode_texts", None),
                                                    byte_bpe=byte_bpe)
            self.byte_bpe = byte_bpe is not None
            self.native_encoder = False
        self._transform = self._native.transform
        self._options = (float(config.rate), float(config.spm_rate), config.level == "document",
                         config.mask_sentinels, -1 if self.split_id is None else self.split_id)
        self._native.set_options(*self._options)
        self.sample = self._native.sample

    # DataLoader workers started with "spawn" get a pickled copy: the native object is rebuilt there
    # (the tokenizer pickles itself, with its model).
    def __getstate__(self) -> dict:
        return {"config": self.config, "tokenizer": self.tokenizer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], state["tokenizer"])

    def __call__(self, context: np.ndarray, *, seed: int, epoch: int, index: int) -> FimResult:
        # This runs once per sample in every data worker: kept to one native call and no lookups.
        tokens, loss, middle, modes = self._transform(
            context if type(context) is np.ndarray else np.asarray(context), seed & _MASK64, epoch & _MASK64,
            index & _MASK64, *self._options)
        return FimResult(tokens, loss, middle, [_MODES[m] for m in modes])

    def reference(self, context: np.ndarray, *, seed: int, epoch: int, index: int) -> FimResult:
        """The same transform by the slow definition (fim_reference.py)."""
        c = self.config
        r = _ref.transform_context(context, self.tokenizer, seed=seed, epoch=epoch, index=index, rate=c.rate,
                                   spm_rate=c.spm_rate, level=c.level, mask_sentinels=c.mask_sentinels,
                                   split_token=self.split_id)
        return FimResult(r.tokens, r.loss_mask, r.middle_mask, r.modes)


def unpermute(tokens, tokenizer, split_token: int | None = None) -> list[bytes]:
    """The original bytes of each end-of-text-separated piece of a FIM'd context (of each file, when
    the pieces were split on ``split_token``, an id: ``FimTransform.split_id``).

    Exact for every piece the context holds in full (context level); a piece cut off by the end of
    the context gives what is left of prefix + middle + suffix in that order.
    """
    return _ref.unpermute(tokens, tokenizer, split_token)
