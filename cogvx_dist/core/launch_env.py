"""What the launcher put in the environment: MPI or not, and this process's rank, before any process group exists.

Torch-free, so the prep tier, the train entry point and the distributed module share one reading of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Set by mpiexec/mpirun of MPICH (Hydra: PMI_*), Open MPI (OMPI_*, PMIX_*), MVAPICH (MV2_*), Intel MPI (PMI_*).
MPI_ENV_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def under_mpi(env: Mapping[str, str] | None = None) -> bool:
    """True when an MPI launcher started this process."""
    env = os.environ if env is None else env
    return any(name in env for name in MPI_ENV_MARKERS)


def env_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher set it (torchrun/DeepSpeed RANK, or MPI's), 0 if none."""
    env = os.environ if env is None else env
    for name in _RANK_VARIABLES:
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0
