#!/usr/bin/env bash
# Prep (videos -> latent shards) as NP MPI processes; each learns its rank from mpi4py, the last one to finish
# writes manifest.json. Any `cogvx prep` flags pass through.
#
#   NP=8 [HOSTFILE=hostfile] launchers/prep_mpi.sh --model THUDM/CogVideoX-2b --data /data/videos --out /data/shards
#
# Environment: NP (processes; default: the hostfile's slots, else 2), HOSTFILE ("host slots=N" lines, optional:
# without it every process runs here), MPIEXEC (default mpiexec), MPI_FLAVOR (openmpi|mpich, default: detected),
# MPI_ARGS (extra mpiexec flags, word-split), PYTHON, DRY_RUN=1 prints the commands.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || die "usage: NP=N $0 --model M --data D --out DIR [cogvx prep flags]"
MPI_HOST_ARGS=()
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "hostfile $HOSTFILE not found"
    slots="$(hostfile_slots "$HOSTFILE")"  # always read: a bad hostfile fails here
    mpi_host_args "$HOSTFILE"
    NP="${NP:-$slots}"
fi
NP="${NP:-2}"
mpi_env_args
# shellcheck disable=SC2206  # MPI_ARGS is a list of flags on purpose
extra=(${MPI_ARGS:-})
run "$MPIEXEC" -n "$NP" "${MPI_HOST_ARGS[@]}" "${MPI_ENV_ARGS[@]}" "${extra[@]}" "$PYTHON" -m cogvx_dist prep "$@"
