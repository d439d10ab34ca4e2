"""How closely an exported Hugging Face model follows megafim, on real text, in fp32 and bf16.

    python benchmarks/hf_agreement.py --checkpoint runs/quickstart/checkpoints [--prompts 8] [--out ...json]

Exports the checkpoint twice with tools/convert_checkpoint_to_hf.py (--dtype float32 and bfloat16),
loads each with ``transformers.AutoModelForCausalLM`` and compares, on the first tokens of held-out
standard-library files (the quick start's split): the logits' max abs difference (HF fp32 vs megafim
fp32; HF bf16 vs megafim bf16; each bf16 model vs the fp32 reference), how often the argmax agrees,
and whether HF ``generate`` gives the same greedy continuation as megafim's ``generate``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megafim.data.tokenizer import Tokenizer  # noqa: E402
from megafim.inference.generate import generate  # noqa: E402
from megafim.inference.loading import load_model  # noqa: E402
from megafim.inference.sampling import SamplingConfig  # noqa: E402
from report import command, machine, write_json  # noqa: E402
from speculative_decoding import read, stdlib_files  # noqa: E402


def export(checkpoint: str, out: Path, dtype: str) -> None:
    spec = importlib.util.spec_from_file_location("convert_checkpoint_to_hf", ROOT / "tools/convert_checkpoint_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    if tool.main(["--load", checkpoint, "--save", str(out), "--dtype", dtype]) != 0:
        raise SystemExit(f"hf_agreement: exporting {checkpoint} as {dtype} failed")


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"max_abs_diff": float((a - b).abs().max()), "mean_abs_diff": float((a - b).abs().mean()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def greedy_agreement(ours, hf, prompts: list[list[int]], new: int, pad: int) -> str:
    same = 0
    for prompt in prompts:
        mine = generate(ours, prompt, SamplingConfig(max_new_tokens=new))[0]
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=pad)[0, len(prompt):].tolist()
        same += mine == theirs
    return f"{same}/{len(prompts)}"


def main() -> None:
    import transformers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="tokens of each file scored")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hf_agreement.json")
    args = p.parse_args()
    loaded = load_model(args.checkpoint)
    tok = Tokenizer.from_file(loaded.tokenizer_path)
    ours32 = loaded.model
    ours16 = load_model(args.checkpoint, dtype=torch.bfloat16).model
    length = min(args.tokens, ours32.config.max_seq_len)
    texts = []
    for path in stdlib_files(held_out=True):
        ids = tok.encode(read(path))
        if len(ids) >= length:
            texts.append(ids[:length])
        if len(texts) == args.prompts:
            break
    batch = torch.tensor(texts)
    work = Path(tempfile.mkdtemp(prefix="hf_agreement-"))
    export(args.checkpoint, work / "fp32", "float32")
    export(args.checkpoint, work / "bf16", "bfloat16")
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(work / "fp32", dtype=torch.float32).eval()
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(work / "bf16", dtype=torch.bfloat16).eval()
    shutil.rmtree(work)  # the models are loaded
    with torch.no_grad():
        ref = ours32.logits(batch, heads=[0])[0]
        logits = {"hf_fp32": hf32(batch).logits, "hf_bf16": hf16(batch).logits,
                  "megafim_bf16": ours16.logits(batch, heads=[0])[0]}
    prompts = [t[: length // 2] for t in texts]
    result = {
        "benchmark": "hf_agreement",
        "machine": machine("shared with other jobs"),
        "command": command(),
        "checkpoint": str(loaded.source), "n_future": ours32.config.n_future,
        "parameters": ours32.config.num_parameters(), "texts": len(texts), "tokens_per_text": length,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "logits": {
            "hf_fp32 vs megafim_fp32": compare(logits["hf_fp32"], ref),
            "hf_bf16 vs megafim_bf16": compare(logits["hf_bf16"], logits["megafim_bf16"]),
            "hf_bf16 vs megafim_fp32": compare(logits["hf_bf16"], ref),
            "megafim_bf16 vs megafim_fp32": compare(logits["megafim_bf16"], ref),
            "reference_logit_std": float(ref.std()),
        },
        "greedy_continuations_identical": {
            "fp32": greedy_agreement(ours32, hf32, prompts, args.new_tokens, tok.fim_pad),
            "bf16": greedy_agreement(ours16, hf16, prompts, args.new_tokens, tok.fim_pad),
        },
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
