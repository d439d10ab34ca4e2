"""Our sentencepiece BPE model as a Hugging Face ``tokenizer.json`` that gives the same ids.

Sentencepiece's BPE merges, at each step, the adjacent pair whose concatenation is the vocabulary
piece with the highest score. A Hugging Face BPE model merges the pair with the lowest merge rank. So
every way of writing a piece as two pieces becomes one merge rule, ranked by the score of the piece it
makes; spaces become U+2581 first (sentencepiece's escaping), characters outside the vocabulary fall
back to byte tokens, and the special tokens are added as special tokens.

One known difference remains: our tokenizer encodes a literal U+2581 as its three bytes (so that it
decodes back to itself), while the Hugging Face tokenizer, like sentencepiece, reads it as a space.
"""

from __future__ import annotations

import json
from pathlib import Path

from megafim.data.tokenizer import CONTROL, NORMAL, SPECIAL_PIECES, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer

SPACE_SYMBOL = "\u2581"


def _merges(pieces: list[str], scores: list[float], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every split of a mergeable piece into two mergeable pieces, best-scored merged piece first."""
    score_of = {p: s for p, s in zip(pieces, scores)}
    ranked = sorted((p for p in mergeable if len(p) > 1), key=lambda p: (-score_of[p], p))
    merges = []
    for piece in ranked:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((left, right))
    return merges


def build_hf_tokenizer(tokenizer: Tokenizer):
    """A ``tokenizers.Tokenizer`` equal to ``tokenizer`` on every text without a literal U+2581."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    raw_pieces, scores, types = tokenizer.model_spec()
    pieces = [p.decode("utf-8") for p in raw_pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    # Pieces BPE may form by merging: normal, user-defined and unused ones (sentencepiece's bpe_model.cc).
    # Single characters are the starting symbols and need no merge.
    mergeable = {p for p, t in zip(pieces, types) if t in (NORMAL, USER_DEFINED, UNUSED)}
    unk = next(p for p, t in zip(pieces, types) if t == UNKNOWN)
    model = models.BPE(vocab=vocab, merges=_merges(pieces, scores, mergeable), unk_token=unk,
                       fuse_unk=False, byte_fallback=True)
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(" ", SPACE_SYMBOL)
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [p for p, t in zip(pieces, types) if t == CONTROL]
    hf.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in [unk, *specials]])
    return hf


def save_hf_tokenizer(tokenizer, out_dir: str | Path, model_max_length: int = 2048) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into out_dir,
    loadable with ``transformers.AutoTokenizer.from_pretrained(out_dir)``. A Hugging Face tokenizer
    (``megafim.data.tokenizer_hf.HFTokenizer``) is written as it was loaded, FIM tokens included, with
    its end-of-text as ``eos_token`` and its FIM tokens (and ``<repo_name>`` / ``<file_sep>`` when it has
    them) as additional special tokens."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(tokenizer, "save"):  # the imported tokenizer.json, unchanged
        tokenizer.save(out)
        pieces = tokenizer.special_pieces
        fim = [pieces[k] for k in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad", "repo_name", "file_sep")
               if pieces.get(k)]
        special_map = {"eos_token": pieces["eod"], "additional_special_tokens": fim}
        if pieces["fim_pad"]:
            special_map["pad_token"] = pieces["fim_pad"]
    else:
        build_hf_tokenizer(tokenizer).save(str(out / "tokenizer.json"))
        fim = [SPECIAL_PIECES[k] for k in ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad")]
        fim += [p for p in (tokenizer.special_pieces.get(k) for k in ("repo_name", "file_sep")) if p]
        special_map = {"eos_token": SPECIAL_PIECES["eod"], "unk_token": tokenizer.id_to_piece(0),
                       "pad_token": SPECIAL_PIECES["fim_pad"], "additional_special_tokens": fim}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out
