#!/usr/bin/env python3
"""Turn a Hugging Face Llama (1-3.x) or Qwen2/2.5 directory into a megafim checkpoint, optionally
with extra heads.

    python tools/convert_hf_to_checkpoint.py --load hf/llama --save runs/from-hf --n-future 4 \\
        [--init-heads copy] [--untie-embeddings] [--tokenizer-model tok.model | tokenizer-dir/] \\
        [--special-token fim_pad='<|reserved_special_token_0|>' ...]

The result is a step-0 checkpoint that ``python -m megafim.train --load runs/from-hf`` continues from
(weights only: the optimizer starts fresh) and that every megafim tool reads. Heads the directory does
not hold are freshly initialised (``--init-heads random``, seeded) or copies of head 0, the last Llama
layer (``--init-heads copy``). A model with tied embeddings stays tied unless ``--untie-embeddings``
gives it an unembedding of its own (a copy; pipeline parallelism needs it). What megafim cannot run
(sliding windows, experts, other RoPE types) is refused naming the field, with exit code 2. HF ->
megafim -> HF gives back the same tensors. The weights are
streamed: one tensor (or one new head) in memory at a time (docs/conversion.md). ``--special-token``
names a Hugging Face tokenizer's end-of-text / FIM tokens when they are not the known spellings; the
checkpoint's ``config.yaml`` keeps them (``data.special_tokens``), so training from it, and every tool
that reads what that training writes, finds the same tokens without the flags. A tokenizer with more
ids than the model has embedding rows (FIM tokens added by ``tools/add_fim_tokens.py``) grows the
embedding and unembedding to its size, rounded up to a multiple of 128; the new rows are the mean of
the old ones (``megafim/convert/vocab.py``).
"""

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megafim.convert.heads import HEAD_INITS, head_initialiser  # noqa: E402
from megafim.convert.hf_model import hf_to_megafim, model_config_from_hf  # noqa: E402
from megafim.checkpoint import files  # noqa: E402
from megafim.checkpoint.format import HF_TOKENIZER_FILE  # noqa: E402
from megafim.checkpoint.weights import write_weights_checkpoint  # noqa: E402
from megafim.data.tokenizer import load_tokenizer  # noqa: E402
from megafim.convert.vocab import grow_vocab  # noqa: E402
from megafim.training.config import VOCAB_MULTIPLE, TrainConfig, to_dict  # noqa: E402
from tools.preprocess_data import error_text, parse_special_tokens  # noqa: E402


def default_tokenizer(load: Path, tokenizer_model: str | None) -> str | None:
    """The tokenizer the checkpoint keeps (checked to exist): ``--tokenizer-model``, else the
    sentencepiece model a megafim export carries, else the directory's own Hugging Face tokenizer."""
    if tokenizer_model:
        files.tokenizer_source(tokenizer_model)
        return tokenizer_model
    if (load / HF_TOKENIZER_FILE).is_file():
        return str(load / HF_TOKENIZER_FILE)
    return str(load) if (load / "tokenizer.json").is_file() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, type=Path, help="Hugging Face model directory")
    p.add_argument("--save", required=True, type=Path,
                   help="megafim save directory to create (refused when it already holds checkpoints)")
    p.add_argument("--n-future", type=int, help="heads of the megafim model (default: as many as stored)")
    p.add_argument("--init-heads", choices=HEAD_INITS, default="random")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--untie-embeddings", action="store_true",
                   help="give a tied model its own lm_head (a copy of the embedding), e.g. to train "
                   "with pp > 1")
    p.add_argument("--tokenizer-model", help="tokenizer to keep with the checkpoint: a sentencepiece "
                   "model, a tokenizer.json or a Hugging Face tokenizer directory (default: "
                   f"{HF_TOKENIZER_FILE} in --load, else --load's own tokenizer.json, if any)")
    p.add_argument("--special-token", action="append", default=[], metavar="NAME=SPELLING",
                   help="a Hugging Face tokenizer's eod / fim_prefix / fim_middle / fim_suffix / fim_pad "
                   "token, when not a known spelling (repeatable); kept as data.special_tokens")
    args = p.parse_args(argv)
    try:
        tokenizer = default_tokenizer(args.load, args.tokenizer_model)  # a bad path fails before any work
        named = parse_special_tokens(args.special_token)
        if named and tokenizer is None:
            raise ValueError("--special-token: there is no tokenizer to name tokens of (pass --tokenizer-model)")
        # The names must fit the tokenizer kept: checked before any work.
        tok_vocab = load_tokenizer(tokenizer, None, named or None).vocab_size if tokenizer else 0
        untie = args.untie_embeddings
        config = model_config_from_hf(args.load, args.n_future, untie_embeddings=untie)
        # lazy: read only if heads are copied
        head0, _ = hf_to_megafim(args.load, n_future=1, untie_embeddings=untie)
        init = head_initialiser(config, args.init_heads, args.seed, head0)
        state, config = hf_to_megafim(args.load, n_future=config.n_future, init_new_head=init,
                                      untie_embeddings=untie)
        grown = config.vocab_size
        if tok_vocab > config.vocab_size:
            state, config = grow_vocab(state, config, math.ceil(tok_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
        train_cfg = TrainConfig()
        for name, value in dataclasses.asdict(config).items():  # every ModelConfig field is a model.* setting
            setattr(train_cfg.model, name, value)
        if tokenizer:
            train_cfg.data.tokenizer_model = str(Path(tokenizer).resolve())
        train_cfg.data.special_tokens = named
        final = write_weights_checkpoint(args.save, state, config,
                                         yaml.safe_dump(to_dict(train_cfg), sort_keys=False), tokenizer)
    except (OSError, ValueError, KeyError) as err:
        print(f"convert_hf_to_checkpoint: {error_text(err)}", file=sys.stderr)
        return 2
    print(f"wrote {final} ({config.n_future} head(s), {args.init_heads} new heads)")
    if grown != config.vocab_size:
        print(f"grew the vocabulary from {grown} to {config.vocab_size} rows for the tokenizer's {tok_vocab} "
              "tokens (new rows: the mean of the old ones)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
