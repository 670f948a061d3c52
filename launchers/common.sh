# Helpers sourced by the cogvx launchers (not run on its own).
# shellcheck shell=bash

# The repository root (launchers/..), so scripts work from any directory.
COGVX_REPO="${COGVX_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# The interpreter that has cogvx-dist installed (a venv's python, the image's python3, ...).
PYTHON="${PYTHON:-python3}"
# DeepSpeed's launcher; `python -m deepspeed.launcher.runner` is the same program without the console script.
DEEPSPEED="${DEEPSPEED:-deepspeed}"
MPIEXEC="${MPIEXEC:-mpiexec}"

# run CMD...: execute CMD, or with DRY_RUN=1 print it (shell-quoted, one line) so tests and humans see the exact
# command without starting anything.
run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        local quoted
        printf -v quoted '%q ' "$@"
        echo "${quoted% }"
    else
        "$@"
    fi
}

# run_last CMD...: like run, but the script's process becomes CMD (exec): in a container the script is often PID 1,
# which the kernel shields from signals it has no handler for, so the supervisor must take its place to receive
# Kubernetes' SIGTERM.
run_last() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        run "$@"
    else
        exec "$@"
    fi
}

# say MSG...: progress on stderr, prefixed with the script name (stdout stays the command stream in dry runs).
say() {
    echo "$(basename "$0"): $*" >&2
}

die() {
    say "error: $*"
    exit 2
}

# Take a first line with `| sed -n 1p`, never `| head -n 1`: head exits early, the writer dies of SIGPIPE, and with
# pipefail the whole script stops (exit 141) at random.

# Hostfiles are read by `cogvx launch hostfile`, the parser `cogvx launch check` and the DeepSpeed launcher rules
# use, so a script never reads a hostfile differently from the check (a bad line fails here, with its number).
# hostfile_read FILE FORMAT: the hostfile in FORMAT (hosts | slots | hydra | table); exits 2 on a bad hostfile.
hostfile_read() {
    "$PYTHON" -m cogvx_dist launch hostfile "$1" --format "$2"
}

# hostfile_hosts FILE: the host names of a DeepSpeed/Open MPI hostfile ("host slots=N", # comments), in order.
hostfile_hosts() {
    hostfile_read "$1" hosts
}

# hostfile_slots FILE: the sum of slots over the hostfile's hosts.
hostfile_slots() {
    hostfile_read "$1" slots
}

# precheck CONFIG [OVERRIDES...] -- [check flags]: `cogvx launch check` before a job starts (skip with CHECK=0).
# It fails fast, on one line, on a bad hostfile, config, manifest or batch arithmetic.
precheck() {
    if [[ "${CHECK:-1}" == 1 ]]; then
        run "$PYTHON" -m cogvx_dist launch check --quiet "$@"
    fi
}

# mpi_flavor: "openmpi" or "mpich" (MPI_FLAVOR wins; else asks $MPIEXEC --version; mpich when it cannot tell).
mpi_flavor() {
    if [[ -n "${MPI_FLAVOR:-}" ]]; then
        echo "$MPI_FLAVOR"
        return
    fi
    local version
    version="$("$MPIEXEC" --version 2>/dev/null || true)"  # captured first: `| grep -q` could SIGPIPE mpiexec
    if grep -qiE 'open mpi|openrte|prrte' <<<"$version"; then
        echo openmpi
    else
        echo mpich
    fi
}

# mpi_host_args HOSTFILE: mpiexec flags that place ranks by a "host slots=N" hostfile (the DeepSpeed/Open MPI
# format that the Kubeflow MPI operator writes to /etc/mpi/hostfile). MPICH's Hydra wants "host:N" lines, so a
# converted copy is written next to it (printed, not written, in a dry run).
mpi_host_args() {
    local hostfile="$1"
    if [[ "$(mpi_flavor)" == openmpi ]]; then
        MPI_HOST_ARGS=(--hostfile "$hostfile")
    else
        local converted="${TMPDIR:-/tmp}/cogvx-hydra-hosts.$$"
        local text
        text="$(hostfile_read "$hostfile" hydra)" || exit
        if [[ "${DRY_RUN:-0}" == 1 ]]; then
            echo "# hydra hosts $converted:"
            sed 's/^/#   /' <<<"$text"
        else
            printf '%s\n' "$text" > "$converted"
            # shellcheck disable=SC2064  # the name is fixed now, on purpose
            trap "rm -f '$converted'" EXIT
        fi
        MPI_HOST_ARGS=(-f "$converted")
    fi
}

# mpi_env_args: flags that carry the rendezvous and tuning variables to every rank. Hydra (MPICH) forwards the whole
# environment by itself; Open MPI forwards only what -x names (and refuses to run as root without a flag).
mpi_env_args() {
    MPI_ENV_ARGS=()
    if [[ "$(mpi_flavor)" == openmpi ]]; then
        local name
        for name in $(compgen -e); do
            case "$name" in
                MASTER_ADDR|MASTER_PORT|PYTHONPATH|OMP_NUM_THREADS|HF_*|NCCL_*|TORCH_*|CUDA_*|COGVX_*|DEEPSPEED_*)
                    MPI_ENV_ARGS+=(-x "$name") ;;
            esac
        done
        [[ "$(id -u)" == 0 ]] && MPI_ENV_ARGS+=(--allow-run-as-root)
    fi
    return 0
}
