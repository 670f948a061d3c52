"""Devices and dtypes by name: which device a process uses, and the dtype names configs and flags accept."""

from __future__ import annotations

import re
from typing import Any

from cogvx_dist.core.errors import CogvxError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""dtype names accepted anywhere a config or flag names one."""
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def torch_dtype(name: str) -> Any:
    """The torch dtype of a name in DTYPE_NAMES."""
    import torch

    if name not in DTYPE_NAMES:
        raise CogvxError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {name!r}")
    return getattr(torch, name)


def pick_device(device: str = "auto", local_rank: int = 0) -> str:
    """"auto" is this process's GPU (local_rank modulo the visible GPUs) where torch sees one, else the CPU; "cpu",
    "cuda" and "cuda:N" are checked and passed through."""
    import torch

    if device == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f"cuda:{local_rank % count}" if count else "cpu"
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
