"""Fault injection for the fault tests: real processes that die at a chosen point.

A process started with `COGVX_FAULT="POINT=N"` exits hard (os._exit, no clean-up, like a SIGKILL) the moment it
has passed POINT for the N-th time. The code under test asks for a hook once at start-up; without the variable
the hook is None and nothing is in its path.

Points:
- `train.committed`: a checkpoint was committed; N is its optimizer step (every rank exits, code 75);
- `prep.written`: prep wrote a sample into its open shard; N counts this process's samples (code 3; the shard
  stays a temporary file, as after a crash mid-shard).
"""

from __future__ import annotations

import os
from collections.abc import Callable

FAULT_ENV = "COGVX_FAULT"
EXIT_CODES = {"train.committed": 75, "prep.written": 3}
"""The exit code of a process that a fault ended, per point."""


def fault_hook(point: str, env: dict[str, str] | None = None) -> Callable[[int], None] | None:
    """A callable(count) that exits the process once `count` reaches the configured N, or None without a fault."""
    spec = (os.environ if env is None else env).get(FAULT_ENV, "")
    name, _, value = spec.partition("=")
    if name != point or not value.isdigit():
        return None
    threshold, code = int(value), EXIT_CODES[point]

    def hook(count: int) -> None:
        if count >= threshold:
            os._exit(code)

    return hook
