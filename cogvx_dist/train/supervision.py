"""Ranks that lose what supervises them stop on their own, at a step boundary, with a committed checkpoint.

Two processes stand between a rank and the user: `cogvx train`, which reports how the job ended and ends what is
left of it, and the per-node launcher (DeepSpeed's, torchrun, an MPI proxy), the rank's parent, which ends the
node's other ranks when one fails. Either one killed (SIGKILL, the OOM killer) used to leave the ranks training on
with nobody to report or clean up. Now a thread in every rank checks both every second:

- `cogvx train` puts its host, pid and start time in the ranks' environment (SUPERVISOR_ENV). On that host, the
  supervisor is gone when no live process has that pid and start time (a zombie counts as gone; a reused pid has
  another start time). A rank on another host (pdsh/ssh launches) cannot see it and does not check; there the
  local launcher's death is what the ranks notice (its runner ends it, or it outlives everything and stays).
- A rank started by a launcher (LOCAL_RANK or MPI variables set) remembers its parent's pid; when os.getppid()
  changes, the launcher is gone (the kernel gave the rank to a reaper).

A rank that sees either writes a note naming the loss (output_dir/failures/lost-supervisor-rank-N.json: not a
failure record, which would end the peers at once) and raises the preemption flag. The ranks then agree at the next
step boundary, commit a checkpoint of the step reached and exit 75, rank 0 recording the cause in
output_dir/preempted.json; if no checkpoint commits within checkpoint.preempt_grace_s (a job stuck in a collective),
each rank exits 77 and the last committed checkpoint stays as it was.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.launch_env import env_supervisor, started_by_launcher
from cogvx_dist.core.process import process_alive
from cogvx_dist.core.run_folder import FAILURES

POLL_S = 1.0
"""How often a rank checks that its supervisor and its launcher are still there."""

NOTE_PREFIX = "lost-supervisor-"

_PARENT_AT_START = os.getppid()
"""This process's parent when the training code was imported, early in a rank's start-up: the launcher."""


class Supervision:
    """Watches `cogvx train` (same host) and the rank's launcher; `on_lost(what)` runs once, from the thread,
    when one of them is gone (`what` names it, e.g. "cogvx train (pid 12 on node-a)")."""

    def __init__(self, on_lost: Callable[[str], None], env: Mapping[str, str] | None = None,
                 poll_s: float = POLL_S) -> None:
        supervisor = env_supervisor(env)
        self.supervisor = supervisor if supervisor and supervisor.host == socket.gethostname() else None
        self.parent = _PARENT_AT_START if started_by_launcher(env) and _PARENT_AT_START > 1 else None
        self.on_lost = on_lost
        self.poll_s = poll_s
        self.lost = ""
        """What was lost, once seen ("" before)."""
        self.since = time.time()
        """Notes older than this are an earlier run's (a peer notices only after every rank built its guards)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cogvx-supervision", daemon=True)

    @property
    def watching(self) -> bool:
        return self.supervisor is not None or self.parent is not None

    def check(self) -> str | None:
        """What is gone now (the supervisor first: its loss also takes the launcher's runner), or None."""
        if self.supervisor is not None and not process_alive(self.supervisor.pid, self.supervisor.start_ticks):
            return f"cogvx train (pid {self.supervisor.pid} on {self.supervisor.host})"
        if self.parent is not None and os.getppid() != self.parent:
            return f"the per-node launcher (pid {self.parent} on {socket.gethostname()})"
        return None

    def start(self) -> Supervision:
        if self.watching:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            what = self.check()
            if what is not None:
                self.lost = what
                self.on_lost(what)
                return


def _note(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / FAILURES / f"{NOTE_PREFIX}rank-{rank:05d}.json"


def write_note(output_dir: str | Path, rank: int, what: str) -> None:
    """Say, in the run folder, that this rank lost `what` (never raises: the run goes on to its checkpoint)."""
    note = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "lost": what}
    try:
        path = _note(output_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(note, indent=2) + "\n")
    except OSError:
        pass


def clear_note(output_dir: str | Path, rank: int) -> None:
    """Remove this rank's note of an earlier launch (a resumed run starts clean)."""
    _note(output_dir, rank).unlink(missing_ok=True)


def read_notes(output_dir: str | Path, since: float) -> list[dict[str, object]]:
    """The notes written since `since` (older ones are earlier runs'), oldest first."""
    notes = []
    for path in (Path(output_dir) / FAILURES).glob(f"{NOTE_PREFIX}rank-*.json"):
        try:
            note = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(note, dict) and float(note.get("time", 0.0)) >= since:
            notes.append(note)
    return sorted(notes, key=lambda n: float(n.get("time", 0.0)))
