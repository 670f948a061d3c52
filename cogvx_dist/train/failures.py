"""How a training job ends when it does not finish: exit codes, and the records ranks leave so that `cogvx train`
(and a user) can name the rank and the cause that ended the job first.

Exit codes of a rank, of `cogvx train` and of the launcher scripts:

| code | meaning |
|---|---|
| 0 | finished |
| 1 | a rank failed (a bug, a lost peer, a rank killed without a word); the first failure is in output_dir/failures/ |
| 2 | a user mistake (config, data, checkpoint), one line |
| 75 | preempted (a signal; `cogvx train` or a rank's launcher gone): a checkpoint of the step reached committed |
| 76 | stalled: no step for distributed.stall_timeout_s, or a host out of reach (network check); output_dir/stacks/ |
| 77 | preempted, but the checkpoint did not commit within checkpoint.preempt_grace_s |

After 75, rerun the same command to resume (EX_TEMPFAIL).
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
from cogvx_dist.core.process import describe_wait_status, process_stat
from cogvx_dist.core.run_folder import FAILURES, HEARTBEATS, RunFolder

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
    `in_run_folder` only this host's local record is written: the folder belongs to another run. A secondary record
    (a lost peer) also lists the peers of this host whose processes are gone (`gone`): a rank killed by SIGKILL or
    the OOM killer leaves no record of its own, and this is how the verdict finds it."""
    launch_id = os.environ.get(LAUNCH_ID_ENV)
    record: dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                              "launch_id": launch_id, "exit_code": exit_code, "kind": kind, "message": message,
                              "detail": detail}
    if kind == SECONDARY:
        try:
            record["gone"] = gone_peers(output_dir, rank)
        except (OSError, ValueError):
            record["gone"] = []
    text = json.dumps(record, indent=2) + "\n"
    shared = [RunFolder(output_dir).failure(rank)] if in_run_folder else []
    for path in (*shared, local_failures(launch_id) / f"rank-{rank:05d}.json"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text)
            return
        except OSError:
            continue


def heartbeats_here(output_dir: str | Path, since: float) -> list[dict[str, Any]]:
    """The heartbeats of this host's ranks written since `since` (older ones are an earlier run's, whose pids mean
    nothing now), by rank."""
    host = socket.gethostname()
    beats = []
    for path in (Path(output_dir) / HEARTBEATS).glob("rank-*.json"):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(beat, dict) and beat.get("host") == host and isinstance(beat.get("rank"), int)
                and isinstance(beat.get("pid"), int) and float(beat.get("time", 0.0)) >= since):
            beats.append(beat)
    return sorted(beats, key=lambda b: b["rank"])


def gone_peers(output_dir: str | Path, rank: int, settle_s: float = 0.2) -> list[dict[str, Any]]:
    """Peers on this host whose process has ended, from their heartbeats of this run (host, pid): each as rank,
    host, pid and, while the dead process is still a zombie its launcher has not reaped, how it ended. A peer's
    connection closes a moment before its process shows as ended, so when none shows yet this looks once more after
    `settle_s`."""
    import psutil  # DeepSpeed's dependency

    peers = [b for b in heartbeats_here(output_dir, psutil.Process().create_time()) if b["rank"] != rank]
    for attempt in range(2):
        gone = []
        for beat in peers:
            stat = process_stat(beat["pid"])
            if stat is None or stat.ended:
                how = describe_wait_status(stat.wait_status) if stat is not None and stat.state == "Z" else ""
                gone.append({"rank": beat["rank"], "host": beat["host"], "pid": beat["pid"], "how": how})
        if gone or not peers or attempt:
            return gone
        time.sleep(settle_s)
    return []


def verdict(records: list[dict[str, Any]], launcher_signal: str | None = None,
            local_ranks: list[int] | None = None) -> tuple[str, int] | None:
    """The line naming what ended the job and the exit code, from a launch's records (read_failures' order), or
    None when they say nothing. A primary record names its rank. With only secondary ones (ranks that lost a peer),
    the rank whose process died without a record is the cause: a survivor on its host saw it gone. Else
    `launcher_signal`, the signal this host's launcher reported for one of its ranks (DeepSpeed's exits with -N),
    points at this host's ranks (`local_ranks`) that left no record."""
    first = records[0] if records else None
    if first is not None and first.get("kind") == PRIMARY:
        return f"rank {first['rank']} ({first['host']}) ended the job: {first['message']}", \
            int(first["exit_code"]) or EXIT_FAILED
    recorded = {record.get("rank") for record in records}
    here = socket.gethostname()
    for record in records:
        dead = [peer for peer in record.get("gone") or [] if peer.get("rank") not in recorded]
        if not dead:
            continue
        peer = next((p for p in dead if p.get("how")), dead[0])
        how = peer.get("how") or (f"killed by {launcher_signal}, as its launcher reported"
                                  if launcher_signal and peer.get("host") == here else
                                  "killed by a signal such as SIGKILL or the OOM killer, or a crash in native code")
        others = "".join(f"; rank {p['rank']} (pid {p['pid']}) is gone too" for p in dead if p is not peer)
        return (f"rank {peer['rank']} ({peer['host']}, pid {peer['pid']}) ended the job: its process died without a "
                f"record ({how}); rank {record['rank']} then lost its connection to it ({record['message'][:300]})"
                f"{others}"), EXIT_FAILED
    silent = [rank for rank in local_ranks or [] if rank not in recorded]
    lost = f"; rank {first['rank']} lost its connection to it ({first['message'][:300]})" if first else ""
    if launcher_signal and silent:
        who = f"rank {silent[0]}" if len(silent) == 1 else f"one of ranks {', '.join(map(str, silent))}"
        return (f"{who} ({here}) ended the job: killed by {launcher_signal} without a record, as this host's "
                f"launcher reported{lost}"), EXIT_FAILED
    if first is None:
        return None
    return (f"rank {first['rank']} ({first['host']}) lost a peer ({first['message'][:300]}), and no rank recorded a "
            "cause of its own: a rank on another host may have died without a word (see that node's output)"), \
        EXIT_FAILED


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
