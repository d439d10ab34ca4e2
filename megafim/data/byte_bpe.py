"""What megafim's C++ byte-level BPE encoder (``csrc/byte_bpe.h``) needs from a ``tokenizer.json``.

``byte_bpe_spec(spec)`` gives ``(vocab, merges, steps, ignore_merges, reserved)`` for the encoder, or
None when the tokenizer does something it does not reproduce (then the ``tokenizers`` library encodes
everything). The encoder takes ASCII text only and is exact there: the library's ids, id for id
(tests/data/test_byte_bpe.py). See docs/tokenizer.md.
"""

from __future__ import annotations

import numpy as np

# The pre-tokenizer regexes it implements (csrc/byte_bpe.h ByteBpeStep), as tokenizer.json spells them.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
STEP_GPT2, STEP_LLAMA3, STEP_QWEN2, STEP_DIGITS_EACH, STEP_DIGITS_RUNS = range(5)
_REGEX_STEPS = {GPT2_REGEX: STEP_GPT2, LLAMA3_REGEX: STEP_LLAMA3, QWEN2_REGEX: STEP_QWEN2}
# BPE model fields and the values the encoder assumes (the library's defaults).
_PLAIN_BPE = {"dropout": (None, 0.0), "continuing_subword_prefix": (None, ""), "end_of_word_suffix": (None, ""),
              "byte_fallback": (None, False)}


def _steps(pre: dict | None) -> list[int] | None:
    """The encoder's pre-tokenizer steps for this pre_tokenizer, or None when it has no such step."""
    if not pre:
        return None
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    steps: list[int] = []
    for part in parts:
        kind = part.get("type")
        if kind == "ByteLevel":
            if part.get("add_prefix_space"):
                return None
            if part.get("use_regex", True):
                steps.append(STEP_GPT2)
        elif kind == "Digits":
            steps.append(STEP_DIGITS_EACH if part.get("individual_digits") else STEP_DIGITS_RUNS)
        elif kind == "Split":
            step = _REGEX_STEPS.get((part.get("pattern") or {}).get("Regex"))
            if step is None or part.get("invert") or part.get("behavior") != "Isolated":
                return None
            steps.append(step)
        else:
            return None
    return steps


def byte_bpe_spec(spec: dict, u2b: dict[str, int]) -> tuple | None:
    """The encoder's model for the parsed ``tokenizer.json`` ``spec`` (``u2b``: the byte-level alphabet,
    character -> byte), or None when it cannot reproduce the library on ASCII text."""
    model = spec.get("model") or {}
    # NFC leaves ASCII as it is; truncation or padding would change what encode returns.
    if (spec.get("normalizer") or {}).get("type") not in (None, "NFC") or spec.get("truncation") or spec.get("padding"):
        return None
    if model.get("type") != "BPE" or any(model.get(k) not in ok for k, ok in _PLAIN_BPE.items()):
        return None
    steps = _steps(spec.get("pre_tokenizer"))
    if steps is None:
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    if not vocab or any(not all(c in u2b for c in t) for t in vocab):
        return None
    table = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        table[i] = bytes(u2b[c] for c in token)
    present = set(table)
    if any(bytes([b]) not in present for b in range(128)):
        return None
    merges = []
    for m in model.get("merges") or []:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        merged = vocab.get(left + right)
        if left not in vocab or right not in vocab or merged is None:
            return None  # the library refuses such a file; be as strict
        merges.append((vocab[left], vocab[right], merged))
    # Added tokens that are not special are split out of text before pre-tokenization (special ones
    # stay text: HFTokenizer encodes with encode_special_tokens): texts holding one go to the library.
    reserved = [t["content"].encode("utf-8") for t in spec.get("added_tokens") or [] if not t.get("special")]
    return (table, np.asarray(merges, dtype=np.int32).reshape(-1, 3), steps, bool(model.get("ignore_merges")),
            reserved)
