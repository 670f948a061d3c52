"""Devices and dtypes by name: which device a process uses, and the dtype names configs and flags accept."""

from __future__ import annotations

import os
import re
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.launch_env import env_local_world_size

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""dtype names accepted anywhere a config or flag names one."""
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def torch_dtype(name: str) -> Any:
    """The torch dtype of a name in DTYPE_NAMES."""
    import torch

    if name not in DTYPE_NAMES:
        raise CogvxError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {name!r}")
    return getattr(torch, name)


def rank_device(local_rank: int, visible_gpus: int) -> str:
    """The device of the process with this local rank on a node where torch sees `visible_gpus` GPUs: one GPU per
    local rank in order, ranks beyond the count sharing them round-robin; the CPU when there is none."""
    if local_rank < 0:
        raise CogvxError(f"local rank must be >= 0, not {local_rank}")
    return f"cuda:{local_rank % visible_gpus}" if visible_gpus > 0 else "cpu"


def side_device(free_bytes: list[int]) -> str:
    """The GPU for work beside a training run on the same node (`cogvx sample --watch`): the one with the most free
    memory, the highest index on a tie (training ranks take GPUs from 0 up); the CPU when there is none."""
    if not free_bytes:
        return "cpu"
    best = max(range(len(free_bytes)), key=lambda index: (free_bytes[index], index))
    return f"cuda:{best}"


def visible_gpus() -> int:
    """GPUs torch sees in this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_threads_per_rank(cores: int, local_ranks: int) -> int:
    """Intra-op threads for each of `local_ranks` CPU processes sharing `cores` cores: an equal share, at least one.
    More threads than cores in all make each process's spinning OpenMP threads take time from the others, so torch's
    default of a thread per core in each rank slows every rank down when several share a node."""
    return max(1, cores // max(1, local_ranks))


def share_cpu_cores() -> int | None:
    """On a rank without a GPU, sharing its node with other ranks, and where the user did not set OMP_NUM_THREADS,
    give torch this rank's share of the cores (torchrun's convention; DeepSpeed's launcher does it only with
    --bind_cores_to_rank). Returns the threads set, or None where nothing changed."""
    import torch

    local_ranks = env_local_world_size()
    if "OMP_NUM_THREADS" in os.environ or local_ranks <= 1 or visible_gpus() > 0:
        return None
    threads = cpu_threads_per_rank(len(os.sched_getaffinity(0)), local_ranks)
    torch.set_num_threads(threads)
    return threads


def pick_device(device: str = "auto", local_rank: int = 0, beside_training: bool = False) -> str:
    """"auto" is this process's GPU (`rank_device`; `side_device` for work `beside_training`) where torch sees one,
    else the CPU; "cpu", "cuda" and "cuda:N" are checked and passed through."""
    import torch

    if device == "auto":
        if beside_training and visible_gpus() > 1:
            return side_device([torch.cuda.mem_get_info(index)[0] for index in range(visible_gpus())])
        return rank_device(local_rank, visible_gpus())
    if not _DEVICE.match(device):
        raise CogvxError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CogvxError(f"device {device}: no CUDA GPU is visible to torch on this machine")
    return device


def compute_dtype(name: str, device: str) -> Any:
    """"auto" is bfloat16 on a GPU and float32 on the CPU (exact and fast enough at tiny sizes); else the named one."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch_dtype(name)
