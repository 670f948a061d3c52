#!/usr/bin/env bash
# Start THIS node's ranks with torchrun (elastic launch, c10d rendezvous), for clusters that standardise on it.
# Run it once on every node; the ranks meet at MASTER_ADDR:MASTER_PORT.
#
#   NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node0 launchers/train_torchrun.sh run.yaml [section.key=value ...]
#   NNODES=2:4 ... (elastic: the job goes on with 2 to 4 nodes; see docs/CLUSTER.md, "Elastic training")
#
# Each value falls back to what the scheduler provides:
#   NNODES         <- SLURM_NNODES, else 1; MIN:MAX makes the job elastic: torchrun's agent restarts the ranks
#                     on the nodes left when one is lost (up to MAX_RESTARTS times, default 3 when elastic, else 0),
#                     and admits a node that (re)joins at the next restart; every restart resumes from the newest
#                     committed checkpoint at the new world size (set train.global_batch_size: the pre-flight
#                     refuses a range where it cannot be kept, and checkpoint.every_minutes bounds the work lost)
#   RDZV_CONF      <- torchrun --rdzv-conf (default join_timeout=600,last_call_timeout=5: after MIN nodes met,
#                     wait 5 s for more before training)
#   GPUS_PER_NODE  <- SLURM_GPUS_ON_NODE, `nvidia-smi -L`, else 1 (one CPU rank)
#   MASTER_ADDR    <- first host of `scontrol show hostnames $SLURM_JOB_NODELIST`, else 127.0.0.1
#   MASTER_PORT    <- 29500;  RDZV_ID (the job's rendezvous id) <- SLURM_JOB_ID, else "cogvx"
# torchrun passes SIGTERM to the ranks, which checkpoint and exit 75 (checkpoint.preempt_signals). CHECK=0 skips
# `cogvx launch check`; DRY_RUN=1 prints the commands.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || die "usage: NNODES=N GPUS_PER_NODE=G MASTER_ADDR=A $0 run.yaml [section.key=value ...]"
CONFIG="$1"
shift

NNODES="${NNODES:-${SLURM_NNODES:-1}}"
MIN_NODES="${NNODES%%:*}"
MAX_NODES="${NNODES##*:}"
[[ "$MIN_NODES" =~ ^[0-9]+$ && "$MAX_NODES" =~ ^[0-9]+$ ]] || die "NNODES must be N or MIN:MAX, got '$NNODES'"
if [[ "$MIN_NODES" != "$MAX_NODES" ]]; then
    MAX_RESTARTS="${MAX_RESTARTS:-3}"
    ELASTIC=(--elastic "$NNODES")
else
    MAX_RESTARTS="${MAX_RESTARTS:-0}"
    ELASTIC=()
fi
RDZV_CONF="${RDZV_CONF:-join_timeout=600,last_call_timeout=5}"
# torchrun's agent otherwise shares one store with the ranks across restarts, where a restarted rank can read its
# peers' addresses from the attempt before and fail to connect (pytorch/pytorch#135712): each attempt gets its own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        GPUS_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        GPUS_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
    else
        GPUS_PER_NODE=1
    fi
fi
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-cogvx}}"
TORCHRUN="${TORCHRUN:-torchrun}"
say "$NNODES node(s) x $GPUS_PER_NODE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT (id $RDZV_ID)"

precheck --config "$CONFIG" --nodes "$MAX_NODES" --gpus-per-node "$GPUS_PER_NODE" --launcher torchrun \
    "${ELASTIC[@]}" --max-restarts "$MAX_RESTARTS" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@"
run_last "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --max-restarts "$MAX_RESTARTS" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" --rdzv-conf "$RDZV_CONF" \
    -m cogvx_dist.train --config "$CONFIG" "$@"
