"""What the launcher put in the environment: MPI or not, and this process's rank, before any process group exists.

Torch-free, so the prep tier, the train entry point and the distributed module share one reading of it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Set by mpiexec/mpirun of MPICH (Hydra: PMI_*), Open MPI (OMPI_*, PMIX_*), MVAPICH (MV2_*), Intel MPI (PMI_*).
MPI_ENV_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
# torchrun, DeepSpeed's launcher, Open MPI, MPICH (Hydra), MVAPICH.
_LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                         "MV2_COMM_WORLD_LOCAL_SIZE")


SUPERVISOR_ENV = "COGVX_SUPERVISOR"
"""Set by `cogvx train` for the processes it starts: "HOST PID START_TICKS", the process that supervises the job."""


@dataclass
class Supervisor:
    """The `cogvx train` process that started this job (from SUPERVISOR_ENV)."""

    host: str
    pid: int
    start_ticks: int

    def __str__(self) -> str:
        return f"{self.host} {self.pid} {self.start_ticks}"


def this_supervisor() -> Supervisor:
    """This process, as the supervisor of the processes it starts."""
    from cogvx_dist.core.process import process_stat

    stat = process_stat(os.getpid())
    return Supervisor(socket.gethostname(), os.getpid(), stat.start_ticks if stat else 0)


def env_supervisor(env: Mapping[str, str] | None = None) -> Supervisor | None:
    """The supervisor named in the environment, or None (not started by `cogvx train`, or a malformed value)."""
    parts = (os.environ if env is None else env).get(SUPERVISOR_ENV, "").split()
    if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return Supervisor(parts[0], int(parts[1]), int(parts[2]))


def started_by_launcher(env: Mapping[str, str] | None = None) -> bool:
    """True when a per-node launcher started this process as one of its ranks (DeepSpeed's launcher and torchrun
    set LOCAL_RANK; MPI launchers their own variables): its parent is then that launcher."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env or under_mpi(env)


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
