#!/usr/bin/env bash
# Launch one recipe with torchrun on this node, or on one node of many.
#
#   launch/torchrun.sh RECIPE [CLI overrides...]
#
# Environment (all optional):
#   NPROC          processes on this node (default: the GPUs torch.cuda.device_count() sees, CUDA_VISIBLE_DEVICES
#                  honoured; 1 without a GPU). Without a GPU the workers run on the CPU with gloo, and NPROC may be
#                  any number.
#   NNODES         number of nodes (default 1)
#   NODE_RANK      0 on the node that hosts the rendezvous store, > 0 elsewhere (default: $SLURM_NODEID under
#                  srun, else decided by matching the endpoint's host name). c10d assigns the ranks themselves.
#   RDZV_ENDPOINT  host:port of the c10d rendezvous, on node 0 (required when NNODES > 1; one node without it
#                  runs torchrun --standalone on a free local port)
#   RDZV_ID        job id shared by all nodes (default: resnet-lamb)
#   RDZV_TIMEOUT   seconds to wait for the endpoint and for all nodes to join (default 300)
#   MAX_RESTARTS   times torchrun restarts the worker group after a failure (default 0); a restarted group
#                  resumes from the run's last.ckpt (--ckpt_path last; a first start with no checkpoint
#                  starts fresh)
#   NUMA_BINDING   torchrun --numa-binding mode (node | socket | exclusive | core-complex): each worker bound to
#                  CPUs near its GPU (default: none; launch/slurm.sbatch sets exclusive). The DALI loader gives its
#                  threads the CPUs its process may use (DALI_AFFINITY_MASK), so both agree.
#   SHUTDOWN_TIMEOUT  seconds torchrun waits for the workers after forwarding SIGTERM/SIGUSR1 (default 90): a
#                  signalled worker saves last.ckpt after its current optimizer step and exits
#   PYTHON         interpreter (default: the checkout's .venv, else python)
#   STAGE_DIR      a folder on this node's local disk: the recipe's data.root (a shard set: resnet-lamb pack)
#                  is copied there once per node before the workers start (resnet-lamb stage; a complete copy
#                  is kept for the next run), and the run reads it from there (--data.root STAGE_DIR)
#
# Signals: SIGTERM, SIGINT, SIGHUP and SIGUSR1 to this script go to torchrun, which forwards them to the
# workers; each worker saves last.ckpt after its current optimizer step and stops (resnet_lamb.preemption).
# Before any worker starts, launch/preflight.py applies the overrides to the recipe, prints the plan
# for the world size NPROC x NNODES (micro batch, accumulation, steps) and stops with one line on:
# a global batch that world size x micro batch does not divide, --trainer.devices/num_nodes overrides
# that disagree with NPROC/NNODES, an unreachable rendezvous endpoint (after RDZV_TIMEOUT seconds).
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
if [ ! -f "$recipe" ]; then
    echo "torchrun.sh: error: recipe $recipe: no such file" >&2
    exit 2
fi

# the GPUs the workers will see: torch's own count (CUDA_VISIBLE_DEVICES honoured; no nvidia-smi needed)
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
[[ $gpus =~ ^[0-9]+$ ]] || gpus=0
if [ "$gpus" -gt 0 ]; then accel=gpu; else accel=cpu; fi
NPROC=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
RDZV_ID=${RDZV_ID:-resnet-lamb}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-0}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}
for v in NPROC NNODES RDZV_TIMEOUT MAX_RESTARTS SHUTDOWN_TIMEOUT; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || { [ "$v" != MAX_RESTARTS ] && [ "${!v}" -eq 0 ]; }; then
        echo "torchrun.sh: error: $v=${!v}: expected a positive integer" >&2
        exit 2
    fi
done
if [ -n "$NODE_RANK" ] && ! [[ $NODE_RANK =~ ^[0-9]+$ ]]; then
    echo "torchrun.sh: error: NODE_RANK=$NODE_RANK: expected an integer >= 0" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "torchrun.sh: error: NNODES=$NNODES needs RDZV_ENDPOINT=HOST:PORT (node 0's address, the same on every node)" >&2
    exit 2
fi

# The plan first, and the checks: nothing is started when one fails.
NPROC=$NPROC NNODES=$NNODES GPUS=$gpus NODE_RANK=$NODE_RANK RDZV_TIMEOUT=$RDZV_TIMEOUT \
    RDZV_ENDPOINT=${RDZV_ENDPOINT:-} STAGE_DIR=${STAGE_DIR:-} "$py" "$here/launch/preflight.py" "$recipe" "$@"
staged=()
if [ -n "${STAGE_DIR:-}" ]; then staged=(--data.root "$STAGE_DIR"); fi

if [ -z "${RDZV_ENDPOINT:-}" ]; then
    rdzv=(--standalone)
else
    conf="join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT"
    if [ -n "$NODE_RANK" ]; then conf="$conf,is_host=$([ "$NODE_RANK" -eq 0 ] && echo 1 || echo 0)"; fi
    rdzv=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID"
          --rdzv-conf "$conf")
fi
# Workers get their own TCPStore each rendezvous round: with the agent's store shared (torch's default),
# a restarted group can read the killed group's stale addresses and fail in init_process_group
# (gloo connectFullMesh "Connection refused"; pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# preflight.py printed the plan above: fit's rank 0 does not print it a second time
export RESNET_LAMB_PLAN_SHOWN=1
numa=()
if [ -n "${NUMA_BINDING:-}" ] && [ "$NUMA_BINDING" != none ]; then numa=(--numa-binding "$NUMA_BINDING"); fi
# devices x num_nodes = torchrun's world size (Lightning checks it); with several devices the CLI runs
# DDPStrategy (gloo on the CPU); --ckpt_path last: a restart (MAX_RESTARTS) or a requeued job resumes;
# --run.fresh_if_missing true: a first start (no last.ckpt yet) starts fresh (plain `fit --ckpt_path last`
# refuses a run folder without one). The user's overrides come last and win (preflight has checked
# devices/num_nodes among them), but for data.root when STAGE_DIR is set (the node-local copy preflight made).
"$py" -m torch.distributed.run \
    "${rdzv[@]}" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" "${numa[@]}" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    -m resnet_lamb fit --config "$recipe" \
    --trainer.accelerator "$accel" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" \
    --ckpt_path last --run.fresh_if_missing true "$@" ${staged[@]+"${staged[@]}"} &
pid=$!
# torchrun runs in the background so that its failure can be explained below; pass signals on
# (a non-interactive shell's background job ignores SIGINT, so Ctrl-C becomes SIGTERM to torchrun;
# SIGUSR1, SLURM's warning before the time limit, stays SIGUSR1).
stopped=0
trap 'stopped=1; kill -TERM "$pid" 2>/dev/null || true' TERM INT HUP
trap 'stopped=1; kill -USR1 "$pid" 2>/dev/null || true' USR1
rc=0
while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break   # still running: wait was interrupted by a trapped signal
done
if [ "$stopped" -eq 1 ]; then
    echo "torchrun.sh: stopped by a signal; the workers saved last.ckpt after their last optimizer step; the run resumes from it when launched again" >&2
elif [ "$rc" -ne 0 ]; then
    hint="the first failure torchrun reports above is the cause: a worker's traceback, or 'Signal N' for a killed one; launch the same command again to resume from the run's last.ckpt, or set MAX_RESTARTS to restart by itself"
    if [ "$NNODES" -gt 1 ]; then
        hint="$hint; a RendezvousTimeoutError means not all $NNODES nodes joined $RDZV_ENDPOINT (id $RDZV_ID) within RDZV_TIMEOUT=${RDZV_TIMEOUT}s: start every node with the same NNODES, RDZV_ENDPOINT and RDZV_ID"
    fi
    echo "torchrun.sh: error: torchrun exited with status $rc ($hint)" >&2
fi
exit "$rc"
