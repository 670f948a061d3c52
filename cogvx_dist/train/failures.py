"""How a training job ends when it does not finish: exit codes, and the records ranks leave so that `cogvx train`
(and a user) can name the rank and the cause that ended the job first.

Exit codes of a rank, of `cogvx train` and of the launcher scripts:

| code | meaning |
|---|---|
| 0 | finished |
| 1 | a rank failed (a bug, a lost peer); the first failure is in output_dir/failures/ |
| 2 | a user mistake (config, data, checkpoint), one line |
| 75 | preempted: a checkpoint was committed at the step reached; rerun the same command to resume (EX_TEMPFAIL) |
| 76 | stalled: no rank completed a step for distributed.stall_timeout_s; stacks in output_dir/stacks/ |
| 77 | preempted, but the checkpoint did not commit within checkpoint.preempt_grace_s |
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.run_folder import FAILURES, RunFolder

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
EXIT_STALLED = 76
EXIT_PREEMPT_UNSAVED = 77
LAUNCH_ID_ENV = "COGVX_LAUNCH_ID"
"""Set by `cogvx train` for its ranks, so that it reads only the records of its own launch."""

PRIMARY, SECONDARY = "primary", "secondary"
"""A primary failure ended the job; a secondary one followed from it (a peer that vanished mid-collective)."""


_RANK_END = threading.RLock()
"""Held, never released, by the thread that ends this rank."""


def claim_rank_end() -> None:
    """Make the calling thread the one that ends this rank, before it records why; a thread that comes second waits
    here for the first to exit the process. The stall watchdog claims before it kills a stopped peer: the main
    thread's collective breaks on that kill at once, and it would otherwise record the lost peer and exit 1 before
    the stall's record was written (a CI run reported a stalled job as 'a peer rank is gone')."""
    if not _RANK_END.acquire(blocking=False):
        threading.Event().wait()  # forever: the first thread exits the process


class Preempted(Exception):
    """The run stopped on a preemption signal after committing the checkpoint of `step`."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"preempted by {signal_name}: checkpoint of step {step} committed")
        self.step = step
        self.signal_name = signal_name


_RUN_FOLDER_HELD = False


def hold_run_folder() -> None:
    """This rank's run holds its output_dir (rank 0 took the lock and every rank has heard so): its records go there."""
    global _RUN_FOLDER_HELD
    _RUN_FOLDER_HELD = True


def run_folder_held() -> bool:
    """Whether `hold_run_folder` was called in this process."""
    return _RUN_FOLDER_HELD


def local_failures(launch_id: str | None) -> Path:
    """Where a rank leaves its record when the run folder cannot take it (a full disk): this host's temp folder,
    where `cogvx train` on the same node finds it."""
    return Path(tempfile.gettempdir()) / f"cogvx-failures-{launch_id or 'direct'}"


def record_failure(output_dir: str | Path, rank: int, message: str, exit_code: int, kind: str = PRIMARY,
                   detail: str = "", in_run_folder: bool = True) -> None:
    """Leave this rank's failure record (never raises: the run folder may be the thing that failed). Without
    `in_run_folder` only this host's local record is written: the folder belongs to another run."""
    launch_id = os.environ.get(LAUNCH_ID_ENV)
    record = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
              "launch_id": launch_id, "exit_code": exit_code, "kind": kind, "message": message, "detail": detail}
    text = json.dumps(record, indent=2) + "\n"
    shared = [RunFolder(output_dir).failure(rank)] if in_run_folder else []
    for path in (*shared, local_failures(launch_id) / f"rank-{rank:05d}.json"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text)
            return
        except OSError:
            continue


def read_failures(output_dir: str | Path, launch_id: str | None = None,
                  since: float | None = None) -> list[dict[str, Any]]:
    """Failure records of a launch (all if `launch_id` is None; with `since`, also any written since then), primary
    ones first, each group oldest first."""
    records = []
    paths = sorted((Path(output_dir) / FAILURES).glob("rank-*.json"))
    if launch_id is not None:
        paths += sorted(local_failures(launch_id).glob("rank-*.json"))
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and (launch_id is None or record.get("launch_id") == launch_id
                                         or (since is not None and record.get("time", 0.0) >= since)):
            records.append(record)
    return sorted(records, key=lambda r: (r.get("kind") != PRIMARY, r.get("time", 0.0)))


def clear_failures(output_dir: str | Path, rank: int) -> None:
    """Remove this rank's record of an earlier launch (a resumed run starts clean)."""
    RunFolder(output_dir).failure(rank).unlink(missing_ok=True)


def is_peer_loss(err: BaseException) -> bool:
    """True when the error says a peer rank vanished (its connection closed or timed out) rather than what broke."""
    text = f"{type(err).__name__}: {err}".lower()
    return any(marker in text for marker in ("connection closed", "connection reset", "broken pipe",
                                             "distbackenderror", "gloo", "nccl", "timed out", "timeout"))


def record_preemption(output_dir: str | Path, step: int, signal_name: str) -> None:
    """Rank 0, once the checkpoint of `step` committed: the job stopped on purpose and can resume."""
    record = {"step": step, "signal": signal_name, "time": time.time(),
              "launch_id": os.environ.get(LAUNCH_ID_ENV)}
    write_atomic(RunFolder(output_dir).preempted, json.dumps(record, indent=2) + "\n")


def read_preemption(output_dir: str | Path, launch_id: str | None,
                    since: float | None = None) -> dict[str, Any] | None:
    """The preemption record of this launch (or, with `since`, one written since then), or None."""
    path = RunFolder(output_dir).preempted
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    ours = record.get("launch_id") == launch_id or (since is not None and record.get("time", 0.0) >= since)
    return record if ours else None
