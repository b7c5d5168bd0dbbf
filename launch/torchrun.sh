#!/usr/bin/env bash
# Launch one recipe with torchrun on this node, or on one node of many.
#
#   launch/torchrun.sh RECIPE [CLI overrides...]
#
# Environment (all optional):
#   NPROC          processes on this node (default: the number of visible GPUs, else 1 on CPU)
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's rank (default 0; torchrun's c10d rendezvous assigns ranks when unset)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous (default 127.0.0.1:29500)
#   RDZV_ID        job id shared by all nodes (default: resnet-lamb)
#   RDZV_TIMEOUT   seconds to wait for all nodes before failing (default 300)
#   MAX_RESTARTS   times torchrun restarts the worker group after a failure (default 0); a restart
#                  resumes from the run's last.ckpt
# Without a GPU the workers use gloo on the CPU.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: launch/torchrun.sh RECIPE [CLI overrides...]" >&2
    exit 2
fi
recipe=$1
shift
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
if [ -x "$here/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then py="$here/.venv/bin/python"; fi

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
NPROC=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}
NNODES=${NNODES:-1}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
RDZV_ID=${RDZV_ID:-resnet-lamb}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-0}
world=$((NPROC * NNODES))

# The plan first: a batch that does not divide fails here, before any process starts.
"$py" -m resnet_lamb plan --config "$recipe" --world-size "$world"

node_rank=()
if [ -n "${NODE_RANK:-}" ]; then node_rank=(--node-rank "$NODE_RANK"); fi
exec "$py" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC" "${node_rank[@]}" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
    --rdzv-conf "join_timeout=$RDZV_TIMEOUT" \
    --max-restarts "$MAX_RESTARTS" \
    -m resnet_lamb fit --config "$recipe" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" \
    --ckpt_path last "$@"
