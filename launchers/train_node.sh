#!/usr/bin/env bash
# Start THIS node's ranks of a multi-node run without ssh: run it once on every node (Slurm srun, a Kubernetes
# Indexed Job/JobSet pod, or by hand). It becomes `cogvx train --node-rank R`, which runs `deepspeed --no_ssh
# --node_rank R`, passes SIGTERM/SIGUSR1 to every rank (they checkpoint and exit 75), waits for all of them and
# names the rank that failed first. Ranks meet at MASTER_ADDR:MASTER_PORT.
#
#   NODE_RANK=1 NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node0 launchers/train_node.sh run.yaml [section.key=value ...]
#
# Each value falls back to what the scheduler provides:
#   NODE_RANK      <- SLURM_NODEID, JOB_COMPLETION_INDEX (Kubernetes Indexed Job / JobSet)
#   NNODES         <- SLURM_NNODES, else the hostfile's host count
#   GPUS_PER_NODE  <- SLURM_GPUS_ON_NODE, `nvidia-smi -L`, else 1 (one CPU rank)
#   MASTER_ADDR    <- first host of `scontrol show hostnames $SLURM_JOB_NODELIST`, else the hostfile's first host
#   MASTER_PORT    <- 29500
# HOSTFILE: DeepSpeed needs one on every node to number the ranks (host names do not matter with --no_ssh); if it
# is unset, one is written with NNODES hosts of GPUS_PER_NODE slots. CHECK=0 skips `cogvx launch check` (run on
# every node: it also proves that each node sees the shared shards and model). DRY_RUN=1 prints the commands.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || die "usage: NODE_RANK=R NNODES=N MASTER_ADDR=A $0 run.yaml [section.key=value ...]"
CONFIG="$1"
shift

NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-${JOB_COMPLETION_INDEX:-}}}"
[[ -n "$NODE_RANK" ]] || die "NODE_RANK is not set (nor SLURM_NODEID or JOB_COMPLETION_INDEX)"
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "hostfile $HOSTFILE not found"
    file_hosts="$(hostfile_hosts "$HOSTFILE")"  # always read: a bad hostfile fails here
    NNODES="${NNODES:-$(wc -l <<<"$file_hosts")}"
fi
NNODES="${NNODES:-${SLURM_NNODES:-}}"
[[ -n "$NNODES" ]] || die "NNODES is not set (nor SLURM_NNODES or HOSTFILE)"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        GPUS_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        GPUS_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
    else
        GPUS_PER_NODE=1
    fi
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
    elif [[ -n "${HOSTFILE:-}" ]]; then
        MASTER_ADDR="$(sed -n 1p <<<"$file_hosts")"
    fi
fi
[[ -n "${MASTER_ADDR:-}" ]] || die "MASTER_ADDR is not set (the address of node 0, reachable from every node)"
MASTER_PORT="${MASTER_PORT:-29500}"
(( NODE_RANK >= 0 && NODE_RANK < NNODES )) || die "NODE_RANK $NODE_RANK is not within $NNODES nodes"

if [[ -z "${HOSTFILE:-}" ]]; then
    # Same content on every node; the names are placeholders, DeepSpeed only counts slots with --no_ssh.
    HOSTFILE="${TMPDIR:-/tmp}/cogvx-hostfile-${NNODES}x${GPUS_PER_NODE}"
    hostfile_text="$(for ((i = 0; i < NNODES; i++)); do echo "node-$i slots=$GPUS_PER_NODE"; done)"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "# hostfile $HOSTFILE:"
        sed 's/^/#   /' <<<"$hostfile_text"
    else
        # Write-then-rename: launchers sharing a TMPDIR never read a half-written file.
        printf '%s\n' "$hostfile_text" > "$HOSTFILE.$$"
        mv -f "$HOSTFILE.$$" "$HOSTFILE"
    fi
fi
say "node $NODE_RANK of $NNODES, $GPUS_PER_NODE ranks here, master $MASTER_ADDR:$MASTER_PORT"

precheck --config "$CONFIG" --hostfile "$HOSTFILE" --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" \
    --launcher no-ssh --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@"
run_last "$PYTHON" -m cogvx_dist train --config "$CONFIG" --nproc "$GPUS_PER_NODE" --hostfile "$HOSTFILE" \
    --node-rank "$NODE_RANK" --nnodes "$NNODES" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@"
