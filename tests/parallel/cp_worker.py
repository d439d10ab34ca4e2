"""torchrun worker: context parallelism (x tensor, x sequence parallelism) against one unsplit model.

Usage: torchrun --standalone --nproc_per_node=N tests/parallel/cp_worker.py TOKENIZER CASE [CASE ...]
with CASE = "cp=<c>,tp=<t>,sp=<0|1>" and N = c x t. Every rank builds the same seeded model (n_future
= 4) and the same batch of packed, FIM'd contexts with their documents, runs it unsplit as the
reference (document mask, positions reset per document), then splits a copy over tp and cp and runs
this rank's chunks. The losses summed over the context-parallel ranks and every gradient (gathered
over tp, summed over cp) must equal the reference's to 1e-5 relative. Prints "OK <case> ..." on rank 0.
"""

import copy
import sys
import traceback

import torch
import torch.distributed as dist

from megafim.data.tokenizer import Tokenizer
from megafim.model.documents import Documents, token_layout
from megafim.parallel import ParallelDims, apply_tensor_parallel
from megafim.parallel.context_parallel import apply_context_parallel, gathered_positions, local_positions
from megafim.training.distributed import WorldInfo, init_distributed
from tests.model.test_documents import fim_contexts, packed_batch, tiny_model
from tests.parallel.tp_worker import full_grad

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(case: str, tok: Tokenizer) -> None:
    fields = {k: int(v) for k, v in (item.split("=") for item in case.split(","))}
    cp, tp, sp = fields["cp"], fields["tp"], bool(fields["sp"])
    dims = ParallelDims.build(tp=tp, pp=1, cp=cp)
    batch = packed_batch(fim_contexts(tok, seq=96, batch=2), tok.eod)
    docs = Documents(batch["segment_ids"], batch["label_segment_ids"], mask_attention=True, reset_positions=True)
    reference = tiny_model()
    ref = reference(batch["tokens"], batch["labels"], batch["loss_mask"], documents=docs)
    ref.loss.backward()

    model = copy.deepcopy(reference)
    model.zero_grad()
    apply_tensor_parallel(model, dims, sequence_parallel=sp)
    apply_context_parallel(model, dims)
    seq = batch["tokens"].shape[1]
    local, keys = local_positions(seq, cp, dims.cp_rank), gathered_positions(seq, cp)
    layout = token_layout(docs, seq, query_index=local, key_index=keys)
    targets = model.targets(batch["labels"], batch["loss_mask"], docs).select(local)
    h = model.trunk(model.embed(batch["tokens"][:, local]), layout=layout)
    loss, head_losses = model.loss_from_trunk(h, targets, layout=layout)
    loss.backward()

    total = torch.stack([loss.detach(), *head_losses])
    dist.all_reduce(total, group=dims.cp_group)  # each rank's share of the sequence's masked means
    errors = {"loss": _rel(total[0], ref.loss.detach()), "head losses": _rel(total[1:], ref.head_losses)}
    ref_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        grad = full_grad(param, dims.tp_group, tp).clone()
        dist.all_reduce(grad, group=dims.cp_group)
        errors[name] = _rel(grad, ref_grads[name].grad)
    worst = max(errors, key=errors.get)
    if errors[worst] > RTOL:
        raise AssertionError(f"{case}: {worst} differs by {errors[worst]:.2e} relative")
    if dims.rank == 0:
        print(f"OK {case} worst={worst}:{errors[worst]:.1e} loss={float(total[0]):.6f}", flush=True)


def main() -> int:
    init_distributed(WorldInfo.from_env(), "gloo")
    tok = Tokenizer.from_file(sys.argv[1])
    try:
        for case in sys.argv[2:]:
            run_case(case, tok)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
