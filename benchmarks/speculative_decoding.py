"""Self-speculative decoding with the extra heads vs plain greedy decoding, on a trained 4-head model.

    python benchmarks/speculative_decoding.py --checkpoint runs/quickstart/checkpoints      (any device)
    python benchmarks/speculative_decoding.py --train-steps 600 --size 125M --device cuda  (GPU)

With --checkpoint it loads a trained megafim checkpoint (or exported HF directory). With
--train-steps it first trains a model of --size with 4 heads on the standard library's source (a
tokenizer from tools/train_tokenizer.py, plain PyTorch AdamW on the model's own multi-token loss),
which is how benchmarks/gpu_all.sh runs it on a machine with no checkpoint.

Prompts are the first --prompt-tokens tokens of held-out standard-library files (the quick start's
hash rule: sha1(path) % 100 < 2). For each prompt both decoders produce --new-tokens tokens; the
benchmark checks that their outputs are identical, and reports tokens per forward pass, the share of
drafted tokens accepted, and wall-clock tokens/s: the median over --repeats passes over all prompts,
and the sum of each prompt's fastest repeat (robust on a shared machine, where load only adds time).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megafim.data.tokenizer import Tokenizer  # noqa: E402
from megafim.inference.generate import generate  # noqa: E402
from megafim.inference.loading import load_model  # noqa: E402
from megafim.inference.sampling import SamplingConfig  # noqa: E402
from megafim.inference.speculative import speculative_generate  # noqa: E402
from megafim.model import GPT, model_config  # noqa: E402
from report import command, machine, write_json  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(held_out: bool) -> list[Path]:
    """Standard-library *.py files on one side of the quick start's held-out split."""
    out = []
    for path in sorted(STDLIB.rglob("*.py")):
        rel = path.relative_to(STDLIB).as_posix()
        if "site-packages" in rel:
            continue
        if (int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < 2) == held_out:
            out.append(path)
    return out


def read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def train_model(args, device: torch.device) -> tuple[GPT, Tokenizer]:
    """A 4-head model trained for --train-steps on the stdlib's training side (for machines without one)."""
    work = Path(tempfile.mkdtemp(prefix="speculative-"))
    files = stdlib_files(held_out=False)[: args.train_files or None]
    inputs = [str(STDLIB)] if not args.train_files else [str(f) for f in files]
    subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", *inputs,
                    "--vocab-size", str(args.vocab_size), "--output-prefix", str(work / "tok"), "--threads",
                    str(min(8, os.cpu_count() or 1))], check=True, capture_output=True)
    tok = Tokenizer.from_file(work / "tok.model")
    texts = [t for t in map(read, files) if t.strip()]
    ids = torch.from_numpy(__import__("numpy").concatenate(
        [x for arr in tok.encode_batch(texts) for x in (arr, [tok.eod])]).astype("int64"))
    config = model_config(args.size, n_future=4, vocab_size=tok.vocab_size, max_seq_len=args.seq)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.train_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=gen)
        window = torch.stack([ids[s:s + args.seq + 1] for s in starts.tolist()]).to(device)
        with autocast:
            loss = model(window[:, :-1], window[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.train_steps - 1:
            print(f"train step {step}: loss (sum of 4 heads) {loss.item():.3f}", flush=True)
    print(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return model.eval(), tok


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained megafim checkpoint / save dir, or an HF directory")
    p.add_argument("--train-steps", type=int, default=0, help="train a model first (when no --checkpoint)")
    p.add_argument("--size", default="tiny")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--train-files", type=int, default=0, help="train on the first N stdlib files (0: all)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/speculative_decoding.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.checkpoint:
        loaded = load_model(args.checkpoint, device=device)
        model, tok = loaded.model, Tokenizer.from_file(loaded.tokenizer_path)
        source = str(loaded.source)
    elif args.train_steps:
        model, tok = train_model(args, device)
        source = f"trained here: {args.size}, {args.train_steps} steps of {args.batch} x {args.seq} tokens"
    else:
        raise SystemExit("speculative_decoding: pass --checkpoint DIR or --train-steps N")
    model = model.to(getattr(torch, args.dtype)).eval()
    if model.config.n_future < 2:
        raise SystemExit(f"speculative_decoding: {source} has {model.config.n_future} head; drafting needs >= 2")
    prompts = []
    for path in stdlib_files(held_out=True):
        ids = tok.encode(read(path))
        if len(ids) >= args.prompt_tokens:
            prompts.append(ids[: args.prompt_tokens])
        if len(prompts) == args.prompts:
            break
    greedy = SamplingConfig(max_new_tokens=args.new_tokens)
    plain_times, spec_times, totals = [], [], None
    per_prompt = [([], []) for _ in prompts]  # (greedy, speculative) seconds of each repeat
    for _ in range(args.repeats):
        plain_s = spec_s = 0.0
        tokens = passes = drafted = accepted = identical = 0
        for prompt, (plain_list, spec_list) in zip(prompts, per_prompt):
            ref, dt = timed(lambda: generate(model, prompt, greedy)[0], device)
            plain_s += dt
            plain_list.append(dt)
            (out, stats), dt = timed(lambda: speculative_generate(model, prompt, args.new_tokens), device)
            spec_s += dt
            spec_list.append(dt)
            identical += out == ref
            tokens, passes = tokens + stats.tokens, passes + stats.forward_passes
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        plain_times.append(plain_s)
        spec_times.append(spec_s)
        totals = dict(tokens=tokens, forward_passes=passes, drafted=drafted, accepted=accepted, identical=identical)
    plain, spec = statistics.median(plain_times), statistics.median(spec_times)
    # On a shared machine other jobs only ever add time: the fastest repeat of each prompt is the
    # least disturbed measurement of it.
    plain_min = sum(min(a) for a, _ in per_prompt)
    spec_min = sum(min(b) for _, b in per_prompt)
    result = {
        "benchmark": "speculative_decoding",
        "machine": machine(None if device.type == "cuda" else "CPU shared with other jobs"),
        "command": command(),
        "threads": torch.get_num_threads(),
        "model": {"source": source, "n_future": model.config.n_future, "parameters": model.config.num_parameters(),
                  "dtype": args.dtype},
        "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "outputs_identical": f"{totals['identical']}/{len(prompts)}",
        "tokens_per_forward_pass": round(totals["tokens"] / totals["forward_passes"], 3),
        "acceptance_rate": round(totals["accepted"] / max(totals["drafted"], 1), 3),
        "greedy_tokens_per_s": round(totals["tokens"] / plain, 1),
        "speculative_tokens_per_s": round(totals["tokens"] / spec, 1),
        "speedup": round(plain / spec, 3),
        "speedup_fastest_repeat_per_prompt": round(plain_min / spec_min, 3),
        "greedy_tokens_per_s_fastest": round(totals["tokens"] / plain_min, 1),
        "speculative_tokens_per_s_fastest": round(totals["tokens"] / spec_min, 1),
        "raw_seconds": {"greedy": [round(t, 3) for t in plain_times], "speculative": [round(t, 3) for t in spec_times]},
    }
    where = result["machine"].get("gpu") or f"{result['machine']['cpu']}, {result['machine']['cores']} cores"
    print(f"{source}: {len(prompts)} prompts x {args.new_tokens} new tokens, {args.repeats} repeats, {where}")
    for key in ("outputs_identical", "tokens_per_forward_pass", "acceptance_rate", "greedy_tokens_per_s",
                "speculative_tokens_per_s", "speedup", "speedup_fastest_repeat_per_prompt"):
        print(f"  {key:26} {result[key]}")
    write_json(args.out, result)
    if totals["identical"] != len(prompts):
        sys.exit("speculative_decoding: speculative output differs from greedy decoding")


if __name__ == "__main__":
    main()
