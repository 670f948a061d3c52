#!/usr/bin/env bash
# Start THIS node's ranks with torchrun (elastic launch, c10d rendezvous), for clusters that standardise on it.
# Run it once on every node; the ranks meet at MASTER_ADDR:MASTER_PORT.
#
#   NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node0 launchers/train_torchrun.sh run.yaml [section.key=value ...]
#
# Each value falls back to what the scheduler provides:
#   NNODES         <- SLURM_NNODES, else 1
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

precheck --config "$CONFIG" --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" --launcher no-ssh \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@"
run_last "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    -m cogvx_dist.train --config "$CONFIG" "$@"
