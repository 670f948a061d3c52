"""The progress watchdog: a thread in every rank that ends the job when it cannot go on.

- A peer failed: any rank's failure record (output_dir/failures/) newer than this rank's start ends this rank
  within about a second. A peer blocked in a collective cannot notice a lost peer by itself (DeepSpeed's CPU
  shared-memory all-reduce has no timeout; NCCL waits for its timeout), and a signal handler never runs while the
  main thread is inside such a call, so the record is the job's error flag.
- No progress: the watchdog notices a job making no progress and ends it, naming the ranks that did not reach the
  step and leaving every reachable rank's Python stacks in output_dir/stacks/.

Each rank writes a heartbeat (host, pid, last completed step) every few seconds. When no step (or checkpoint)
has completed for distributed.stall_timeout_s, the watchdog of a waiting rank: dumps its own stacks; asks the ranks
on its host to dump theirs (SIGUSR2, registered with faulthandler; SIGCONT wakes a stopped one so it can); names
the ranks whose heartbeat is behind; records the stall; kills those on its host; and exits with code 76. A
collective blocked in C++ cannot be interrupted from Python, which is why this runs in its own thread.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cogvx_dist.core.faults import delay_hook
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.run_folder import FAILURES, HEARTBEATS, RunFolder

POLL_S = 1.0
"""How often a rank looks for a peer's failure record."""

STACK_SIGNAL = signal.SIGUSR2


def register_stack_dump(output_dir: str | Path, rank: int) -> None:
    """Make SIGUSR2 dump this process's Python stacks to output_dir/stacks/rank-N.txt (faulthandler keeps the file
    open for the process's life)."""
    path = RunFolder(output_dir).stacks(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    faulthandler.register(STACK_SIGNAL, file=open(path, "a"), all_threads=True, chain=False)


def read_heartbeats(output_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Every rank's last heartbeat, by rank."""
    beats = {}
    for path in (Path(output_dir) / HEARTBEATS).glob("rank-*.json"):
        try:
            beat = json.loads(path.read_text())
            beats[int(beat["rank"])] = beat
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return beats


def lagging_ranks(beats: dict[int, dict[str, Any]], world_size: int, stale_after_s: float,
                  now: float | None = None) -> list[int]:
    """Ranks that did not reach the furthest step, or whose heartbeat stopped (or never came)."""
    now = now or time.time()
    furthest = max((b.get("step", -1) for b in beats.values()), default=-1)
    lagging = [rank for rank in range(world_size)
               if rank not in beats or beats[rank].get("step", -1) < furthest
               or now - float(beats[rank].get("time", 0.0)) > stale_after_s]
    return lagging


class Watchdog:
    """Heartbeats and stall detection for one rank; `progress(step)` after every completed step or checkpoint.

    `on_stall(message, kill_lagging)` and `on_peer_failure(record)` end the rank. On a stall, `on_stall` must record
    the stall before it calls `kill_lagging`: this rank's main thread sees the killed peer's connection close at once,
    and the rank's end has to be claimed (failures.claim_rank_end) before then, or the main thread reports the lost
    peer as the job's cause."""

    def __init__(self, output_dir: str | Path, rank: int, world_size: int, stall_timeout_s: float,
                 on_stall: Callable[[str, Callable[[], None]], None],
                 on_peer_failure: Callable[[dict[str, Any]], None],
                 tick: Callable[[], None] | None = None) -> None:
        self.run = RunFolder(output_dir)
        self.rank, self.world_size = rank, world_size
        self.stall_timeout_s = stall_timeout_s
        self.interval_s = max(0.5, min(5.0, stall_timeout_s / 5)) if stall_timeout_s else 5.0
        self.on_stall = on_stall
        self.on_peer_failure = on_peer_failure
        self.tick = tick
        self.slow_kill = delay_hook("train.stall_kill_delay_ms")
        self.step = 0
        import psutil  # DeepSpeed's dependency

        self.started_at = psutil.Process().create_time()
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cogvx-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.run.heartbeat(self.rank).parent.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread.start()
        return self

    def progress(self, step: int) -> None:
        self.step = step
        self.last_progress = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        beat = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
                "time": time.time()}
        try:
            write_atomic(self.run.heartbeat(self.rank), json.dumps(beat) + "\n")
        except OSError:
            pass  # a full disk must not kill the watchdog; the save path reports it

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(min(POLL_S, self.interval_s)):
            failure = self._peer_failure()
            if failure is not None:
                self.on_peer_failure(failure)
                return
            # Judged before this rank beats again: a rank that was itself stopped (and is running again because
            # the waiting rank woke it to dump its stacks) still has its stale heartbeat on disk, so it names itself.
            idle = time.monotonic() - self.last_progress
            if self.stall_timeout_s and idle > self.stall_timeout_s:
                message, lagging_pids = self._stall_report(idle)
                self.on_stall(message, functools.partial(self._kill, lagging_pids))
                return
            if time.monotonic() - last_beat >= self.interval_s:
                last_beat = time.monotonic()
                self._beat()
                if self.tick is not None:
                    try:
                        self.tick()
                    except OSError:
                        pass  # e.g. a full disk: the lock's heartbeat waits for the next tick

    def _peer_failure(self) -> dict[str, Any] | None:
        """Another rank's failure record written since this rank started (older ones are earlier runs')."""
        for path in (self.run.root / FAILURES).glob("rank-*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written: seen on the next poll
            if record.get("rank") != self.rank and record.get("time", 0.0) >= self.started_at:
                return record
        return None

    def _stall_report(self, idle: float) -> tuple[str, list[int]]:
        """Dump stacks here and on this host's other ranks; the one-line cause and the lagging local ranks' pids."""
        stacks = self.run.stacks(self.rank)
        with open(stacks, "a") as handle:
            handle.write(f"--- rank {self.rank} stalled at step {self.step} after {idle:.0f} s ---\n")
            handle.flush()
            faulthandler.dump_traceback(file=handle, all_threads=True)
        beats = read_heartbeats(self.run.root)
        lagging = lagging_ranks(beats, self.world_size, 3 * self.interval_s)  # this rank too, if it was stopped
        local = {r: int(b["pid"]) for r, b in beats.items()
                 if r != self.rank and b.get("host") == socket.gethostname() and "pid" in b}
        for pid in local.values():
            _signal(pid, STACK_SIGNAL)
            _signal(pid, signal.SIGCONT)  # a stopped rank dumps once it runs again
        time.sleep(min(2.0, self.interval_s))
        named = ", ".join(map(str, lagging)) if lagging else "none (every rank is waiting)"
        message = (f"stalled: no step completed for {idle:.0f} s (distributed.stall_timeout_s "
                   f"{self.stall_timeout_s:g}); rank(s) {named} fell behind or stopped responding at step "
                   f"{self.step}; stacks in {stacks.parent}")
        return message, [local[rank] for rank in lagging if rank in local]

    def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        if self.slow_kill:
            self.slow_kill()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
