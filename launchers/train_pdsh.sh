#!/usr/bin/env bash
# Multi-node training from ONE node: DeepSpeed reads the hostfile and starts every node's ranks over pdsh/ssh.
#
#   HOSTFILE=launchers/hostfile launchers/train_pdsh.sh run.yaml [section.key=value ...]
#
# Needs: passwordless ssh from this node to every host in the hostfile, pdsh installed, and the same repository,
# Python environment and paths (shared storage for shards and output_dir) on every node: DeepSpeed runs
# `cd $PWD; $PYTHON -m deepspeed.launcher.launch ...` on each host.
# Environment reaching the remote ranks: NCCL_*, PYTHON*, UCX_*, MV2_* variables of this shell, plus every
# KEY=VALUE line of ./.deepspeed_env or ~/.deepspeed_env (see launchers/deepspeed_env.example).
#
# Environment: HOSTFILE (default ./hostfile), MASTER_ADDR (default: first host of the hostfile),
# MASTER_PORT (29500), NNODES / GPUS_PER_NODE (optional: use only the first NNODES hosts / this many GPUs each),
# CHECK=0 skips `cogvx launch check`, DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || die "usage: HOSTFILE=hostfile $0 run.yaml [section.key=value ...]"
CONFIG="$1"
shift
HOSTFILE="${HOSTFILE:-hostfile}"
[[ -f "$HOSTFILE" ]] || die "hostfile $HOSTFILE not found (format: one 'host slots=N' per line; see launchers/hostfile.example)"
first_host="$(hostfile_hosts "$HOSTFILE" | sed -n 1p)"  # always read: a bad hostfile fails here
MASTER_ADDR="${MASTER_ADDR:-$first_host}"
MASTER_PORT="${MASTER_PORT:-29500}"

limits=()
[[ -n "${NNODES:-}" ]] && limits+=(--num_nodes "$NNODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && limits+=(--num_gpus "$GPUS_PER_NODE")
check=(--config "$CONFIG" --hostfile "$HOSTFILE" --launcher pdsh --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
[[ -n "${NNODES:-}" ]] && check+=(--nodes "$NNODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && check+=(--gpus-per-node "$GPUS_PER_NODE")

precheck "${check[@]}" "$@"
run "$DEEPSPEED" --hostfile "$HOSTFILE" "${limits[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module cogvx_dist.train --config "$CONFIG" "$@"
