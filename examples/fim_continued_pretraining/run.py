#!/usr/bin/env python3
"""FIM continued pretraining of a Hugging Face model: import it, train it with FIM (rate 0.9) and 4
future-token heads, export it, infill with the export.

    python examples/fim_continued_pretraining/run.py --out runs/fim_cpt          # CPU: a tiny random Llama
    python examples/fim_continued_pretraining/run.py --out runs/fim_cpt_1b \\
        --hf-model hf/Llama-3.2-1B --data corpus.jsonl --config examples/fim_continued_pretraining/gpu.yaml \\
        --launcher "torchrun --standalone --nproc_per_node 8"                     # a real checkpoint on GPUs

Every stage is one of megafim's tools, run as a command that the log prints:
  1. tokenizer  the model's tokenizer (without --hf-model: a byte-level BPE trained here with
                ``tokenizers`` on standard-library sources) with the FIM tokens it lacks added by
                tools/add_fim_tokens.py
  2. model      --hf-model, or a tiny random ``LlamaConfig`` model saved by transformers
  3. data       tools/preprocess_data.py with that tokenizer (default data: standard-library sources)
  4. import     tools/convert_hf_to_checkpoint.py --n-future 4 --init-heads copy (embedding rows added
                for new token ids: the mean of the old rows)
  5. train      python -m megafim.train --config <the trainer YAML + the imported model> --load <import>
  6. export     tools/convert_checkpoint_to_hf.py
  7. infill     python -m megafim.infill on the export, and transformers' generate from it
Nothing is downloaded. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "examples")]  # this checkout's megafim, as the stages (run from REPO) use

from logged_run import run_logged  # noqa: E402
from megafim.training.config import SPECIAL_TOKEN_NAMES  # noqa: E402
STDLIB = Path(sysconfig.get_paths()["stdlib"])
DEFAULT_DATA = ("json", "email", "http", "logging", "importlib", "asyncio")  # stdlib packages
TOKENIZER_TEXT = ("collections", "unittest", "xml", "urllib", "concurrent")  # other ones
# Llama 3's pre-tokenizer split (the tokenizer the tiny model gets is byte-level BPE like Llama 3's).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PREFIX = "def fibonacci(n):\n    \"\"\"The n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
SUFFIX = "    return a\n\n\nprint(fibonacci(10))\n"


class ExampleError(Exception):
    """A bad setting or a failed stage: one line (or a log tail) on stderr, exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="new or empty directory for everything written")
    p.add_argument("--hf-model", type=Path, help="Hugging Face Llama / Qwen2 directory (default: build a "
                   "tiny random Llama)")
    p.add_argument("--tokenizer", type=Path, help="Hugging Face tokenizer (tokenizer.json or directory); "
                   "default: --hf-model's own, else one trained here")
    p.add_argument("--special-token", action="append", default=[], metavar="NAME=SPELLING",
                   help="name a token the tokenizer has as eod / fim_prefix / fim_middle / fim_suffix / "
                   "fim_pad (repeatable), e.g. fim_prefix='<|reserved_special_token_2|>' for Llama 3")
    p.add_argument("--data", nargs="+", help="JSONL files, or source files / directories (default: "
                   "standard-library sources)")
    p.add_argument("--config", type=Path, default=HERE / "cpu_tiny.yaml", help="trainer YAML (default: "
                   "cpu_tiny.yaml)")
    p.add_argument("--train-iters", type=int, help="default: the config's")
    p.add_argument("--launcher", default="", help="runs '<launcher> -m megafim.train', e.g. 'torchrun "
                   "--standalone --nproc_per_node 8' (default: one process)")
    p.add_argument("--vocab-size", type=int, default=1024, help="the tokenizer trained here (no --hf-model)")
    p.add_argument("--export-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-new-tokens", type=int, default=32, help="infill length")
    p.add_argument("--device", default="", help="infill device (default: cuda when available, else cpu)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every setting checked before any stage runs."""
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ExampleError(f"--out {args.out}: exists and is not empty; choose a new directory")
    if args.hf_model is not None and not (args.hf_model / "config.json").is_file():
        raise ExampleError(f"--hf-model {args.hf_model}: no config.json (not a Hugging Face model directory)")
    tokenizer = args.tokenizer or (args.hf_model if args.hf_model is not None else None)
    if tokenizer is not None and not (tokenizer.is_file() or (tokenizer / "tokenizer.json").is_file()):
        raise ExampleError(f"--tokenizer {tokenizer}: no tokenizer.json there (pass --tokenizer)")
    for path in args.data or []:
        if not Path(path).exists() and not any(c in path for c in "*?["):
            raise ExampleError(f"--data {path}: no such file or directory")
    if not args.config.is_file():
        raise ExampleError(f"--config {args.config}: no such file")
    if args.train_iters is not None and args.train_iters < 1:
        raise ExampleError(f"--train-iters {args.train_iters}: must be at least 1")
    if args.vocab_size < 300:
        raise ExampleError(f"--vocab-size {args.vocab_size}: must be at least 300 (256 bytes + merges)")
    for item in args.special_token:
        name, sep, spelling = item.partition("=")
        if not sep or not spelling or name not in SPECIAL_TOKEN_NAMES:
            raise ExampleError(f"--special-token {item}: expected NAME=SPELLING with NAME one of "
                               f"{', '.join(SPECIAL_TOKEN_NAMES)}")


def run(cmd: list[str], log: Path) -> None:
    """Run a stage's command from the repository root, its output into ``log``; print the command."""
    run_logged(cmd, log, REPO, ExampleError)


def stage(n: int, name: str) -> None:
    print(f"=== {n}/7 {name}", flush=True)


def train_tokenizer(out: Path, vocab_size: int) -> Path:
    """A Llama-3-style byte-level BPE ``tokenizer.json`` trained on standard-library sources."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end_of_text|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = sorted(str(p) for name in TOKENIZER_TEXT for p in (STDLIB / name).rglob("*.py"))
    tok.train(files, trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def tiny_llama(out: Path, vocab_size: int, max_seq_len: int) -> Path:
    """A random Llama (3 layers of 64: the import makes 2 trunk layers and head 0 of them)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_seq_len, rope_theta=500000.0,
                                      tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def model_vocab(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def train_config(trainer_yaml: Path, imported: Path, out: Path) -> Path:
    """The trainer YAML with the imported model's shape as its ``model:`` section (the YAML's own
    ``model:`` keys go over it: only shape-neutral ones, as a resume refuses any shape change)."""
    own = yaml.safe_load(trainer_yaml.read_text()) or {}
    model = yaml.safe_load((imported / "latest").parent.joinpath(
        (imported / "latest").read_text().strip(), "config.yaml").read_text())["model"]
    merged = {**own, "model": {**model, **(own.get("model") or {})}}
    out.write_text(yaml.safe_dump(merged, sort_keys=False))
    return out


def transformers_infill(hf_dir: Path, max_new_tokens: int, device: str) -> str:
    """The middle ``AutoModelForCausalLM.generate`` writes from the exported directory, greedy, for a
    PSM prompt spelled with the run's FIM tokens (as the export names them), stopped at end-of-text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pieces = json.loads((hf_dir / "megafim_special_tokens.json").read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).to(device).eval()
    text = f"{pieces['fim_prefix']}{PREFIX}{pieces['fim_suffix']}{SUFFIX}{pieces['fim_middle']}"
    prompt = tok(text, add_special_tokens=False, return_tensors="pt").to(device)
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    middle = ids[0, prompt["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in middle:  # what megafim.infill writes: up to end-of-text, other tokens by name
        middle = middle[:middle.index(tok.eos_token_id)]
    return tok.decode(middle, skip_special_tokens=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        return run_stages(args)
    except ExampleError as err:
        print(f"fim_continued_pretraining: {err}", file=sys.stderr)
        return 2


def run_stages(args: argparse.Namespace) -> int:
    import torch

    out, py = args.out, sys.executable
    out.mkdir(parents=True, exist_ok=True)
    log, start = out / "stages.log", time.time()
    cfg = yaml.safe_load(args.config.read_text()) or {}
    seq_length = int((cfg.get("data") or {}).get("seq_length", 64))

    stage(1, "tokenizer")
    source = args.tokenizer or args.hf_model
    if source is None:
        source = train_tokenizer(out / "tokenizer_plain" / "tokenizer.json", args.vocab_size)
        print(f"trained a byte-level BPE of {args.vocab_size} tokens: {source}")
    tokenizer = out / "tokenizer"
    named = dict(item.partition("=")[::2] for item in args.special_token)
    # Named tokens the tokenizer has are not added again (the vocabulary stays as it is).
    spell = [f"--{name.replace('_', '-')}-token={spelling}" for name, spelling in named.items()]
    run([py, "tools/add_fim_tokens.py", "--tokenizer", str(source), "--output", str(tokenizer), *spell], log)
    from megafim.data.tokenizer import load_tokenizer
    try:
        vocab = load_tokenizer(tokenizer, None, named or None).vocab_size
    except ValueError as err:
        raise ExampleError(f"--special-token: {err}") from None
    names = [f"--special-token={name}={spelling}" for name, spelling in named.items()]

    stage(2, "model")
    model = args.hf_model or tiny_llama(out / "hf_tiny", vocab, max(256, seq_length))
    rows = model_vocab(model)
    print(f"model {model}: {rows} embedding rows, tokenizer {vocab} tokens"
          + (" (the import adds rows for the new ids)" if rows < vocab else ""))

    stage(3, "data")
    data = args.data or [str(STDLIB / name) for name in DEFAULT_DATA]
    run([py, "tools/preprocess_data.py", "--input", *data, "--output-prefix", str(out / "data" / "train"),
         "--tokenizer-model", str(tokenizer), *names, "--append-eod", "--workers", "2", "--quiet"], log)

    stage(4, "import")
    imported = out / "imported"
    run([py, "tools/convert_hf_to_checkpoint.py", "--load", str(model), "--save", str(imported),
         "--n-future", "4", "--init-heads", "copy", "--tokenizer-model", str(tokenizer), *names], log)

    stage(5, "train")
    config = train_config(args.config, imported, out / "train_config.yaml")
    launcher = shlex.split(args.launcher) if args.launcher else [py]
    run([*launcher, "-m", "megafim.train", "--config", str(config), "--load", str(imported), "--save",
         str(out / "run"), "--data-path", str(out / "data" / "train_text_document"), "--tokenizer-model",
         str(tokenizer), *(["--train-iters", str(args.train_iters)] if args.train_iters else [])], log)
    last = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    heads = " ".join(f"{last[k]:.3f}" for k in sorted(last) if k.startswith("loss_head_"))
    print(f"step {last['step']}: loss {last['loss']:.4f} (the sum over the heads: {heads})")

    stage(6, "export")
    hf_out = out / "hf"
    run([py, "tools/convert_checkpoint_to_hf.py", "--load", str(out / "run"), "--save", str(hf_out),
         "--dtype", args.export_dtype], log)

    stage(7, "infill")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    (out / "prefix.py").write_text(PREFIX)
    (out / "suffix.py").write_text(SUFFIX)
    run([py, "-m", "megafim.infill", "--checkpoint", str(hf_out), "--prefix-file", str(out / "prefix.py"),
         "--suffix-file", str(out / "suffix.py"), "--max-new-tokens", str(args.max_new_tokens), "--device",
         device, "--json"], out / "infill_megafim.json")
    megafim_middle = json.loads((out / "infill_megafim.json").read_text().splitlines()[-1])["middles"][0]
    hf_middle = transformers_infill(hf_out, args.max_new_tokens, device)
    result = {"prefix": PREFIX, "suffix": SUFFIX, "megafim_infill": megafim_middle,
              "transformers_generate": hf_middle, "final_step": last["step"], "final_loss": last["loss"]}
    (out / "infill.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"megafim.infill middle: {megafim_middle!r}\ntransformers generate middle: {hf_middle!r}")
    print(f"done in {time.time() - start:.0f} s: {hf_out} loads with AutoModelForCausalLM / AutoTokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
