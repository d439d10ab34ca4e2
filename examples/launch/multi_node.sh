#!/usr/bin/env bash
# Train across several machines: run this script once on every node, with the same arguments.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 examples/launch/multi_node.sh \
#       --config examples/configs/1.3B.yaml --data-path DATA --tokenizer-model TOK --save CKPT
#   (and NODE_RANK=1 on the second node)
#
# Environment: NNODES (nodes in the job), NODE_RANK (this node, 0-based), MASTER_ADDR / MASTER_PORT
# (where node 0 listens for the rendezvous), NPROC_PER_NODE (default: GPUs on this node, else 1),
# RDZV_ID (a job id shared by the nodes, default "megafim"). The static rendezvous on node 0's address
# needs no etcd; every node must reach MASTER_ADDR:MASTER_PORT. All other arguments go to megafim.train.
# A rank that dies makes every agent restart its ranks (up to MAX_RESTARTS, default 3, times); they
# resume from the newest complete checkpoint in --save (--load defaults to --save when it holds one).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node, 0 .. NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0}"
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK" \
  --nproc-per-node="$NPROC_PER_NODE" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m megafim.train "$@"
