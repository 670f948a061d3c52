"""Who am I in the prep job: rank, world size and local rank, from flags, MPI, torchrun or Kubernetes.

Order: explicit flags > mpi4py (only when an MPI launcher's environment is present, so a plain run never initialises
MPI) > RANK/WORLD_SIZE (torchrun style) > JOB_COMPLETION_INDEX (Kubernetes Indexed Job, world size from the flag or
WORLD_SIZE) > a single process.
"""

from __future__ import annotations

import os

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.launch_env import RankInfo, under_mpi


def _env_int(name: str, env: dict[str, str]) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as err:
        raise CogvxError(f"environment variable {name}={value!r} is not an integer") from err


def discover_ranks(rank: int | None = None, world_size: int | None = None,
                   env: dict[str, str] | None = None) -> RankInfo:
    """This process's RankInfo (see the module docstring for the order)."""
    env = dict(os.environ) if env is None else env
    local_env = _env_int("LOCAL_RANK", env)
    if rank is not None:
        if world_size is None:
            raise CogvxError("--rank needs --world-size")
        _check(rank, world_size, "flags")
        return RankInfo(rank, world_size, local_env if local_env is not None else 0, "flags")
    if under_mpi(env):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        size = comm.Get_size()
        if world_size is not None and world_size != size:
            raise CogvxError(f"--world-size {world_size} but mpiexec started {size} processes")
        return RankInfo(comm.Get_rank(), size, local, "mpi", comm)
    env_rank, env_world = _env_int("RANK", env), _env_int("WORLD_SIZE", env)
    if env_rank is not None:
        size = world_size if world_size is not None else env_world
        if size is None:
            raise CogvxError("RANK is set but WORLD_SIZE is not (set both, or pass --rank/--world-size)")
        _check(env_rank, size, "RANK/WORLD_SIZE")
        return RankInfo(env_rank, size, local_env if local_env is not None else 0, "env")
    index = _env_int("JOB_COMPLETION_INDEX", env)
    if index is not None:
        size = world_size if world_size is not None else env_world
        if size is None:
            raise CogvxError(
                "JOB_COMPLETION_INDEX is set but the world size is unknown: pass --world-size or set WORLD_SIZE "
                "to the Job's completions"
            )
        _check(index, size, "JOB_COMPLETION_INDEX")
        return RankInfo(index, size, 0, "k8s")
    if world_size not in (None, 1):
        raise CogvxError(f"--world-size {world_size} without --rank (and no MPI, RANK or JOB_COMPLETION_INDEX)")
    return RankInfo(0, 1, 0, "single")


def _check(rank: int, world_size: int, where: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise CogvxError(f"{where}: rank {rank} is not within a world of {world_size}")
