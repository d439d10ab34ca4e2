"""The quick start: the whole megafim path on the embedded default corpus, the Python standard library.

    python examples/quickstart.py [--out runs/quickstart] [--vocab-size 8192] [--train-iters 600]

corpus -> tokenizer -> .bin/.idx -> FIM samples -> a small FIM + 4-head model trained on the CPU ->
AR / FIM / middle-only loss on held-out files -> a Hugging Face export -> an infilling demo.

Each stage runs the same command-line tool a user would run, and prints that command, so the output
doubles as a tutorial. Everything lands under --out; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELD_OUT_PERCENT = 2  # of the stdlib files, chosen by a hash of their path: stable across machines
# The fewest files that leave a held-out file and, under tiny.yaml's split "98,2,0", a validation
# document among the training files (round(0.98 n) < n needs n > 25).
MIN_FILES = 30


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(args: list[str]) -> None:
    """Run one tool with this interpreter, echoing the command; stop the quick start if it fails."""
    cmd = [sys.executable, *args]
    print("$ " + shlex.join(cmd).replace(sys.executable, "python"), flush=True)
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"quickstart: the step above failed with exit code {result.returncode}")


def write_corpus(out: Path, max_files: int | None = None) -> tuple[Path, Path, int, int]:
    """Write the stdlib's *.py files as train / held-out JSONL (one document per file); with
    ``max_files``, only that many (the first in sorted order). The held-out split is never empty: when
    the hash puts no file there (a small ``max_files``), the last training file moves to it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out.mkdir(parents=True, exist_ok=True)
    train: list[str] = []
    held: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        if max_files is not None and len(train) + len(held) >= max_files:
            break
        rel = path.relative_to(stdlib).as_posix()
        if "site-packages" in rel:
            continue  # third-party code installed into this Python, not the stdlib
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        if not text.strip():
            continue  # empty __init__.py files: nothing to learn from
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100
        (held if bucket < HELD_OUT_PERCENT else train).append(json.dumps({"text": text, "path": rel}) + "\n")
    if not held and train:
        held.append(train.pop())
    train_path, held_path = out / "train.jsonl", out / "heldout.jsonl"
    train_path.write_text("".join(train), encoding="utf-8")
    held_path.write_text("".join(held), encoding="utf-8")
    return train_path, held_path, len(train), len(held)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quickstart")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--train-iters", type=int, default=600)
    parser.add_argument("--max-files", type=int, help=f"use only this many stdlib files (quick checks; "
                        f"at least {MIN_FILES})")
    args = parser.parse_args(argv)
    if args.max_files is not None and args.max_files < MIN_FILES:
        print(f"quickstart: error: --max-files {args.max_files}: at least {MIN_FILES} files are needed (a "
              "held-out file for stage 6 and a validation share of the training files)", file=sys.stderr)
        sys.exit(2)
    out = args.out.resolve()
    start = time.time()

    banner("1/8 corpus: the Python standard library's own source")
    train_jsonl, held_jsonl, n_train, n_held = write_corpus(out / "corpus", args.max_files)
    print(f"{n_train} training files -> {train_jsonl}\n{n_held} held-out files -> {held_jsonl}")

    banner("2/8 tokenizer: sentencepiece BPE, lossless on code, with FIM sentinels")
    tok_prefix = out / "tokenizer" / "stdlib"
    tok_prefix.parent.mkdir(parents=True, exist_ok=True)
    run(["tools/train_tokenizer.py", "--input", str(train_jsonl), "--json-keys", "text",
         "--vocab-size", str(args.vocab_size), "--output-prefix", str(tok_prefix)])
    tokenizer = f"{tok_prefix}.model"

    banner("3/8 pre-tokenize into Megatron-compatible .bin/.idx")
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, jsonl in (("train", train_jsonl), ("heldout", held_jsonl)):
        run(["tools/preprocess_data.py", "--input", str(jsonl), "--output-prefix", str(data_dir / name),
             "--tokenizer-model", tokenizer, "--json-keys", "text", "--append-eod", "--workers", "2"])
    train_data = data_dir / "train_text_document"

    banner("4/8 what the model sees: FIM samples, sentinels visible")
    run(["tools/inspect_samples.py", "--data-path", str(train_data), "--tokenizer-model", tokenizer,
         "--seq-length", str(args.seq_length), "--fim-rate", "0.9", "--num-samples", "2"])

    banner("5/8 train a small FIM + multi-token model on the CPU (fp32, DeepSpeed ZeRO-1)")
    ckpt = out / "checkpoints"
    run(["-m", "megafim.train", "--config", "examples/configs/tiny.yaml", "--data-path", str(train_data),
         "--tokenizer-model", tokenizer, "--seq-length", str(args.seq_length), "--train-iters",
         str(args.train_iters), "--save", str(ckpt), "--save-interval", str(args.train_iters),
         "--eval-interval", str(max(1, args.train_iters // 3)), "--eval-iters", "4"])
    steps = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    print(f"loss (sum over the heads): {steps[0]['loss']:.2f} at the first logged step -> {steps[-1]['loss']:.2f} "
          "at the last")
    valid = [(m["step"], m["valid_loss"]) for m in steps if "valid_loss" in m]
    print("validation loss (2% of the training files, held out by data.split): "
          + " -> ".join(f"{loss:.2f} at step {step}" for step, loss in valid))

    banner("6/8 evaluate on held-out files: AR, FIM and middle-only loss per head")
    held_data = data_dir / "heldout_text_document"
    run(["-m", "megafim.evaluate", "--load", str(ckpt), "--data-path", str(held_data),
         "--seq-length", str(args.seq_length), "--num-samples", "32"])

    banner("7/8 export to Hugging Face (LlamaForCausalLM + the extra heads beside it)")
    hf_dir = out / "hf"
    run(["tools/convert_checkpoint_to_hf.py", "--load", str(ckpt), "--save", str(hf_dir), "--dtype", "float32"])

    banner("8/8 fill in the middle (SPM prompt, greedy)")
    print("(a demonstration of the path, not of quality: this model is tiny and trained for minutes on a CPU)")
    demo = out / "demo"
    demo.mkdir(exist_ok=True)
    (demo / "prefix.py").write_text("import os\n\n\ndef list_python_files(root):\n    for dirpath, dirnames, filenames in os.walk(root):\n")
    (demo / "suffix.py").write_text("\n                yield os.path.join(dirpath, name)\n")
    print(f"prefix ({demo / 'prefix.py'}):\n{(demo / 'prefix.py').read_text()}suffix ({demo / 'suffix.py'}):\n"
          f"{(demo / 'suffix.py').read_text()}middle:")
    run(["-m", "megafim.infill", "--checkpoint", str(ckpt), "--prefix-file", str(demo / "prefix.py"),
         "--suffix-file", str(demo / "suffix.py"), "--mode", "spm", "--max-new-tokens", "24"])

    banner(f"done in {time.time() - start:.0f} s; everything is under {out}")
    print(f"tokenizer        {tokenizer}")
    print(f"train data       {train_data}.bin/.idx")
    print(f"held-out data    {held_data}.bin/.idx")
    print(f"checkpoints      {ckpt} (metrics: {ckpt / 'metrics.jsonl'})")
    print(f"Hugging Face     {hf_dir}")
    print("next:")
    print(f"  python tools/inspect_samples.py --data-path {train_data} --tokenizer-model {tokenizer} "
          f"--seq-length 2048 --fim-rate 0.5 --json | head")
    print("  python -m megafim.train --config examples/configs/tiny.yaml ... --tensor-model-parallel-size 2  "
          "(under torchrun; examples/launch/ has single-node, multi-node and SLURM scripts)")
    print(f"  python -m megafim.eval.humaneval_infilling --load {ckpt} --benchmark random-span-light")
    print("  python examples/fim_for_free/run.py   (the paper's FIM-for-free comparison at small scale)")


if __name__ == "__main__":
    main()
