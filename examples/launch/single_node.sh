#!/usr/bin/env bash
# Train on one machine with all its GPUs (or N CPU processes): torchrun starts one rank per device.
#
#   examples/launch/single_node.sh --config examples/configs/125M.yaml --data-path DATA --tokenizer-model TOK
#
# NPROC (default: the number of GPUs, else 1) sets the ranks; every other argument goes to megafim.train.
# When a rank dies (killed, out of memory), torchrun stops the others and restarts all of them, up to
# MAX_RESTARTS (default 3) times; they resume from the newest complete checkpoint in --save by
# themselves (--load defaults to --save when it holds checkpoints; docs/checkpoints.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m megafim.train "$@"
