"""Document-masked attention (--reset-attention-mask, --reset-position-ids) vs plain causal attention.

CPU (default): forward + backward of whole models, the tiny and 125M shapes, at seq 2048 with about
10 documents per context (lengths drawn around seq/10), masked vs plain, same weights and tokens;
median of --repeats timed steps after one warm-up. Target: masked / plain <= 1.1.

    python benchmarks/document_attention.py [--seq 2048 --docs 10 --repeats 3 --layers-125m 2]

GPU (--gpu): one transformer block of the 1.3B shape in bf16 at seq 8192, documents averaging 1k
tokens, flash-attn's variable-length kernels vs plain causal flash attention (target: no slower).
Exits 2 with a SKIP message without CUDA or without flash-attn (nothing measured).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megafim.model import GPT, model_config  # noqa: E402
from megafim.model.documents import Documents, token_layout  # noqa: E402
from megafim.model.gpt import Block  # noqa: E402
from megafim.model.layers import rotary_cos_sin  # noqa: E402
from report import command, machine, write_json  # noqa: E402

TARGETS = {"cpu_masked_over_plain_max": 1.1, "gpu_varlen_over_causal_max": 1.0}


def random_documents(batch: int, seq: int, mean_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment_ids, label_segment_ids) (B, T): documents of lengths drawn uniformly in [mean/2, 3 mean/2]."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq + 1:
            lengths.append(int(torch.randint(mean_len // 2, 3 * mean_len // 2 + 1, (), generator=g)))
        full = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[: seq + 1]
        rows.append(full)
    full = torch.stack(rows)
    return full[:, :-1], full[:, 1:]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_case(size: str, n_layers: int | None, seq: int, docs: int, batch: int, repeats: int) -> dict:
    overrides = {"max_seq_len": seq} | ({"n_layers": n_layers} if n_layers else {})
    config = model_config(size, **overrides)
    torch.manual_seed(0)
    model = GPT(config)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g)
    seg, label_seg = random_documents(batch, seq, seq // docs)
    documents = Documents(seg, label_seg, mask_attention=True, reset_positions=True)

    def step(docs_or_none):
        def run():
            model.zero_grad(set_to_none=True)
            model(tokens[:, :-1], tokens[:, 1:], documents=docs_or_none).loss.backward()
        return run

    plain = _median_time(step(None), repeats)
    masked = _median_time(step(documents), repeats)
    row = {"size": size, "n_layers": config.n_layers, "seq": seq, "batch": batch,
           "documents_per_context": round(float(seg.max(dim=1).values.float().mean()) + 1, 1),
           "plain_s": round(plain, 3), "masked_s": round(masked, 3), "ratio": round(masked / plain, 3)}
    print(f"{size:>5} layers {config.n_layers:>2} seq {seq} docs {row['documents_per_context']:>5}: plain "
          f"{plain:7.3f} s  masked {masked:7.3f} s  ratio {masked / plain:.3f}", flush=True)
    return row


def gpu_case(seq: int, mean_len: int, repeats: int, smoke_cpu: bool = False) -> dict:
    """One 1.3B block in bf16 on CUDA; ``smoke_cpu``: the tiny shape in fp32 on the CPU (the same code,
    the SDPA paths instead of flash-attn; checks the script, its numbers mean nothing)."""
    from megafim.model import attention

    if not smoke_cpu and (not torch.cuda.is_available() or attention._flash_attn_varlen_func() is None):
        print("SKIP benchmarks/document_attention.py --gpu: needs CUDA and flash-attn; nothing was measured",
              file=sys.stderr)
        sys.exit(2)
    dev, dtype = ("cpu", torch.float32) if smoke_cpu else ("cuda", torch.bfloat16)
    config = model_config("tiny" if smoke_cpu else "1.3B", max_seq_len=seq)
    torch.manual_seed(0)
    block = Block(config).to(dev, dtype)
    x = torch.randn(1, seq, config.hidden_size, device=dev, dtype=dtype, requires_grad=True)
    seg, label_seg = random_documents(1, seq, mean_len)
    layout = token_layout(Documents(seg.to(dev), label_seg.to(dev)), seq, device=torch.device(dev))

    def step(lay):
        positions = torch.arange(seq, device=dev) if lay is None else lay.rope_positions.reshape(-1)
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)  # (T, hd)
        if lay is not None:
            cos, sin = cos[None], sin[None]  # (1, T, hd): positions restart per document

        def run():
            block(x, cos, sin, None, lay).float().pow(2).mean().backward()
            if dev == "cuda":
                torch.cuda.synchronize()
        return run

    causal = _median_time(step(None), repeats)
    varlen = _median_time(step(layout), repeats)
    print(f"{'tiny (smoke)' if smoke_cpu else '1.3B'} block seq {seq} docs ~{mean_len}: causal {causal * 1e3:.2f} ms  varlen {varlen * 1e3:.2f} ms",
          flush=True)
    return {"seq": seq, "mean_document": mean_len, "causal_ms": round(causal * 1e3, 3),
            "varlen_ms": round(varlen * 1e3, 3), "ratio": round(varlen / causal, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the flash-attn varlen benchmark (CUDA only)")
    p.add_argument("--smoke-cpu", action="store_true", help="with --gpu: run its code on tiny CPU shapes")
    p.add_argument("--seq", type=int, default=None, help="default 2048 on the CPU, 8192 with --gpu")
    p.add_argument("--docs", type=int, default=10, help="documents per context (CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers-125m", type=int, default=2,
                   help="layers of the 125M shape (its 12 take minutes per step on 2 cores; the ratio is per layer)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    if args.gpu:
        seq = args.seq or (512 if args.smoke_cpu else 8192)
        rows = [gpu_case(seq, seq // 8 if args.smoke_cpu else 1024, args.repeats, args.smoke_cpu)]
        target = TARGETS["gpu_varlen_over_causal_max"]
    else:
        seq = args.seq or 2048
        rows = [cpu_case("tiny", None, seq, args.docs, args.batch, args.repeats),
                cpu_case("125M", args.layers_125m, seq, args.docs, args.batch, args.repeats)]
        target = TARGETS["cpu_masked_over_plain_max"]
    out = args.out or str(ROOT / "benchmarks" / "results" / ("document_attention_gpu.json" if args.gpu
                                                             else "document_attention_cpu.json"))
    note = "smoke run on the CPU: checks the script, the numbers mean nothing" if args.smoke_cpu else \
        None if args.gpu else "2 shared CPU cores, other jobs running"
    write_json(out, {"command": command(), "machine": machine(note=note),
        "rows": rows, "target_ratio_max": target, "met": all(r["ratio"] <= target for r in rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
