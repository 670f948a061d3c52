"""One live run per output_dir: rank 0 holds output_dir/train.lock (host, pid, heartbeat) while it trains.

Two runs writing one folder would interleave checkpoints and commit markers. A lock is stale when its holder is
gone: on the same host the pid no longer exists; on another host its heartbeat (refreshed by the holder's
watchdog every few seconds) is older than STALE_AFTER_S.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.run_folder import RunFolder

STALE_AFTER_S = 30.0


def read_lock(output_dir: str | Path) -> dict[str, Any] | None:
    """The lock's content, or None when there is none (or it is unreadable, i.e. being replaced)."""
    try:
        data = json.loads(RunFolder(output_dir).lock.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def holder_alive(lock: dict[str, Any], now: float | None = None) -> bool:
    """True while the lock's holder may still be running."""
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(int(lock.get("pid", 0)), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return (now or time.time()) - float(lock.get("heartbeat", 0.0)) < STALE_AFTER_S


def describe(lock: dict[str, Any]) -> str:
    age = time.time() - float(lock.get("started", time.time()))
    return f"pid {lock.get('pid')} on {lock.get('host')}, started {age:.0f} s ago"


def held_by_another(output_dir: str | Path) -> bool:
    """Whether a live process other than this one holds the folder's lock."""
    lock = read_lock(output_dir)
    if lock is None or not holder_alive(lock):
        return False
    return lock.get("pid") != os.getpid() or lock.get("host") != socket.gethostname()


def check_free(output_dir: str | Path) -> None:
    """Raise the one-line error a second run gets when a live run holds the folder."""
    lock = read_lock(output_dir)
    if lock is not None and holder_alive(lock):
        raise CogvxError(f"output_dir {output_dir} is in use by another training run ({describe(lock)}); "
                         f"wait for it, stop it, or pick another output_dir (lock: {RunFolder(output_dir).lock})")


class RunLock:
    """The lock held by this process (rank 0) for the duration of a run."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = RunFolder(output_dir).lock
        self.output_dir = output_dir
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; a live holder is a CogvxError naming it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
                  "elastic_job": os.environ.get("TORCHELASTIC_RUN_ID")}
        for _ in range(2):
            try:
                with open(self.path, "x") as handle:  # O_EXCL: one winner among racing runs
                    handle.write(json.dumps(record, indent=2) + "\n")
                self.held = True
                return
            except FileExistsError:
                lock = read_lock(self.output_dir)
                # torchrun forms a new worker group only once every agent has stopped its old one (or lost its
                # node): a lock of this elastic job is its previous rank 0's, wherever that ran.
                same_job = lock is not None and lock.get("elastic_job") and \
                    lock.get("elastic_job") == os.environ.get("TORCHELASTIC_RUN_ID")
                if lock is not None and holder_alive(lock) and not same_job:
                    check_free(self.output_dir)
                self.path.unlink(missing_ok=True)  # stale: its holder is gone
        raise CogvxError(f"could not take the lock {self.path}; another run is starting in the same output_dir")

    def refresh(self) -> None:
        """Renew the heartbeat (called by the watchdog)."""
        if not self.held:
            return
        lock = read_lock(self.output_dir) or {}
        if lock.get("pid") != os.getpid() or lock.get("host") != socket.gethostname():
            return  # not ours any more: never overwrite another run's lock
        write_atomic(self.path, json.dumps({**lock, "heartbeat": time.time()}, indent=2) + "\n")

    def release(self) -> None:
        """Drop the lock if this process holds it."""
        if not self.held:
            return
        lock = read_lock(self.output_dir) or {}
        if lock.get("pid") == os.getpid() and lock.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False
