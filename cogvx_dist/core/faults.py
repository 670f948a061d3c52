"""Fault injection for the fault tests: real processes that die, or slow down, at a chosen point.

A process started with `COGVX_FAULT="POINT=N[,POINT=N...]"` acts on each named point; the code under test asks
for its hooks once at start-up, and without the variable every hook is None, so nothing is in its path.

Points:
- `train.committed=STEP`: every rank exits hard (os._exit 86, like a SIGKILL: no clean-up) right after the
  checkpoint of optimizer step STEP committed;
- `train.step_delay_ms=MS`: every optimizer step takes MS milliseconds longer (a slow job, so that tests can
  signal or stop a rank mid-run);
- `train.save_delay_ms=MS`: every rank waits MS milliseconds inside each checkpoint save, after DeepSpeed's files
  are written and before the collectives that gather the whole tensors (a slow save, so that tests can kill a rank
  mid-write);
- `train.preemption_record_delay_ms=MS`: rank 0 waits MS milliseconds before recording a preemption (a slow
  shared filesystem), so that a test can check no rank leaves before the record exists;
- `train.stall_kill_delay_ms=MS`: a stall watchdog waits MS milliseconds after killing the ranks that stopped
  before it ends its own rank (a loaded node), so that a test can check that the main thread, whose collective
  broke on that kill, does not report the lost peer as the job's cause;
- `prep.written=N`: prep exits hard (code 3) after writing its N-th sample into the open shard, which stays a
  temporary file, as after a crash mid-shard;
- `prep.uploaded_bytes=N`: prep exits hard (code 4) once N bytes of a file being uploaded to an output URL were
  handed over, part-way through the upload.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

FAULT_ENV = "COGVX_FAULT"
EXIT_CODES = {"train.committed": 86, "prep.written": 3, "prep.uploaded_bytes": 4}
"""The exit code of a process that a fault ended, per point."""


def _setting(point: str, env: Mapping[str, str] | None) -> int | None:
    for spec in (os.environ if env is None else env).get(FAULT_ENV, "").split(","):
        name, _, value = spec.strip().partition("=")
        if name == point and value.isdigit():
            return int(value)
    return None


def fault_hook(point: str, env: Mapping[str, str] | None = None) -> Callable[[int], None] | None:
    """A callable(count) that exits the process once `count` reaches the configured N, or None without a fault."""
    threshold = _setting(point, env)
    if threshold is None:
        return None
    code = EXIT_CODES[point]

    def hook(count: int) -> None:
        if count >= threshold:
            os._exit(code)

    return hook


def delay_hook(point: str, env: Mapping[str, str] | None = None) -> Callable[[], None] | None:
    """A callable that sleeps the configured milliseconds, or None without a fault."""
    milliseconds = _setting(point, env)
    if milliseconds is None:
        return None
    return lambda: time.sleep(milliseconds / 1000)
