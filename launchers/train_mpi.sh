#!/usr/bin/env bash
# Training with one MPI process per rank (no deepspeed launcher): each rank finds its rank, world size and local
# rank through DeepSpeed's MPI discovery (mpi4py). Use it where mpirun is the way to start jobs (HPC sites, the
# Kubeflow MPI operator's launcher pod).
#
#   NP=16 HOSTFILE=/etc/mpi/hostfile launchers/train_mpi.sh run.yaml [section.key=value ...]
#
# Environment: NP (ranks; default: the hostfile's slots, else 1), HOSTFILE ("host slots=N" lines, optional),
# MASTER_ADDR (default: the hostfile's first host, else 127.0.0.1; exported so that discovery does not fall back to
# `hostname -I` of rank 0), MASTER_PORT (29500), MPIEXEC, MPI_FLAVOR, MPI_ARGS, PYTHON, CHECK=0, DRY_RUN=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || die "usage: NP=N [HOSTFILE=H] $0 run.yaml [section.key=value ...]"
CONFIG="$1"
shift
MPI_HOST_ARGS=()
check=(--config "$CONFIG" --launcher mpi)
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "hostfile $HOSTFILE not found"
    slots="$(hostfile_slots "$HOSTFILE")"  # always read: a bad hostfile fails here
    first_host="$(hostfile_hosts "$HOSTFILE" | sed -n 1p)"
    mpi_host_args "$HOSTFILE"
    NP="${NP:-$slots}"
    MASTER_ADDR="${MASTER_ADDR:-$first_host}"
    check+=(--hostfile "$HOSTFILE")
else
    NP="${NP:-1}"
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
    check+=(--nodes 1 --gpus-per-node "$NP")
fi
export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29500}"
# The check must see the world mpiexec starts: NP ranks filling the hostfile's slots in order, not every slot.
check+=(--world-size "$NP" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
mpi_env_args
# shellcheck disable=SC2206  # MPI_ARGS is a list of flags on purpose
extra=(${MPI_ARGS:-})

precheck "${check[@]}" "$@"
run env MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" \
    "$MPIEXEC" -n "$NP" "${MPI_HOST_ARGS[@]}" "${MPI_ENV_ARGS[@]}" "${extra[@]}" \
    "$PYTHON" -m cogvx_dist.train --config "$CONFIG" "$@"
