"""What the launcher put in the environment: MPI or not, and this process's rank, before any process group exists.

Torch-free, so the prep tier, the train entry point and the distributed module share one reading of it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

# Set by mpiexec/mpirun of MPICH (Hydra: PMI_*), Open MPI (OMPI_*, PMIX_*), MVAPICH (MV2_*), Intel MPI (PMI_*).
MPI_ENV_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
# torchrun, DeepSpeed's launcher, Open MPI, MPICH (Hydra), MVAPICH.
_LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                         "MV2_COMM_WORLD_LOCAL_SIZE")


def under_mpi(env: Mapping[str, str] | None = None) -> bool:
    """True when an MPI launcher started this process."""
    env = os.environ if env is None else env
    return any(name in env for name in MPI_ENV_MARKERS)


def _first_number(names: tuple[str, ...], default: int, env: Mapping[str, str] | None) -> int:
    env = os.environ if env is None else env
    return next((int(env[name]) for name in names if env.get(name, "").isdigit()), default)


def env_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher set it (torchrun/DeepSpeed RANK, or MPI's), 0 if none."""
    return _first_number(_RANK_VARIABLES, 0, env)


def env_world_size(env: Mapping[str, str] | None = None) -> int:
    """The job's process count as the launcher set it (torchrun/DeepSpeed WORLD_SIZE, or MPI's), 1 if none."""
    return _first_number(_SIZE_VARIABLES, 1, env)


def env_local_world_size(env: Mapping[str, str] | None = None) -> int:
    """The job's process count on this node as the launcher set it, 1 if none."""
    return _first_number(_LOCAL_SIZE_VARIABLES, 1, env)


@dataclass
class RankInfo:
    """This process's place in a job (prep or training)."""

    rank: int
    """Global rank, 0..world_size-1."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank among the processes of this node (picks the GPU)."""
    source: str = "env"
    """Where the numbers came from: flags, mpi, env, k8s, single, or the process group."""
    comm: Any = None
    """The mpi4py communicator when prep runs under MPI (used for its final barrier), else None."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every prep rank (MPI only; other launchers finalize through the part files)."""
        if self.comm is not None:
            self.comm.Barrier()


def defer_garbage_collection() -> None:
    """Pause the cyclic garbage collector for a process's start-up. Importing torch, DeepSpeed, transformers, PEFT
    and diffusers creates millions of objects that live as long as the process, and CPython's collector walked them
    all again and again during the imports for nothing: 0.9 of a training rank's 4.5 s of import CPU on a 2-core
    node. `resume_garbage_collection` ends the pause once set-up is done."""
    gc.disable()


def resume_garbage_collection() -> None:
    """End of start-up: what exists now lives until the process ends, so it leaves the collector's sight (gc.freeze:
    later collections walk only what the run allocates) and collection resumes. A no-op where start-up did not
    pause it (a caller that runs the trainer in its own process keeps its own collector). What set-up left as
    garbage is frozen with the rest rather than collected first: in a training rank that was 11k small objects
    (tuples, cells, functions, a few frames; no tensor) among 888k, while the collection would take 0.6 s."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def exit_finished(code: int) -> NoReturn:
    """End a process whose work is done, skipping the interpreter's teardown: with torch, DeepSpeed and diffusers
    loaded, freeing their module state took 0.5-1.4 s of CPU per process on a 2-core node, while the launcher or
    the shell waited. Every file is closed by now; this flushes stdio, shuts logging down and finalizes MPI where
    it was initialized, as their exit hooks would (a launcher may count a rank that skips MPI_Finalize as failed).
    Only for success paths: MPI_Finalize waits for peers, which a failing rank must not."""
    import logging
    import sys

    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    leave_now(code)


def leave_now(code: int) -> NoReturn:
    """Exit at once with `code`, stdio flushed: no clean-up that could wait on a peer (process-group teardown,
    loader workers)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
