"""The watchdog of a rank that was itself stopped names that rank when it runs again, not 'none'.

A stall is ended by whichever rank's watchdog notices first. The waiting rank wakes the stopped one (SIGCONT) so
that it can dump its stacks; the woken rank's watchdog then sees no progress for longer than the timeout too and
may report before the waiting rank does. Its report must still name the rank that stopped: itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.run_folder import RunFolder

TIMEOUT_S = 2.0

WATCHED_RANK = """
import sys, time
from cogvx_dist.train.watchdog import Watchdog, register_stack_dump
register_stack_dump(sys.argv[1], 1)
reports = []
dog = Watchdog(sys.argv[1], rank=1, world_size=2, stall_timeout_s={timeout},
               on_stall=lambda message, kill_lagging: reports.append(message),
               on_peer_failure=lambda record: reports.append(f"peer failure {{record}}"))
dog.progress(6)
dog.start()
print("started", flush=True)
while not reports:
    time.sleep(0.05)
print(reports[0], flush=True)
"""


def _peer_heartbeat(output: Path, step: int) -> None:
    """Rank 0, alive and waiting in step 7's collective: a fresh heartbeat at step 6."""
    beat = {"rank": 0, "host": "elsewhere", "pid": 0, "step": step, "time": time.time()}
    path = RunFolder(output).heartbeat(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(beat) + "\n")


def test_a_rank_woken_after_a_stop_names_itself(tmp_path):
    _peer_heartbeat(tmp_path, 6)
    rank = subprocess.Popen([sys.executable, "-c", WATCHED_RANK.format(timeout=TIMEOUT_S), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "started"
        rank.send_signal(signal.SIGSTOP)
        stopped_until = time.monotonic() + 3 * TIMEOUT_S
        while time.monotonic() < stopped_until:  # the waiting peer keeps beating
            _peer_heartbeat(tmp_path, 6)
            time.sleep(0.2)
        rank.send_signal(signal.SIGCONT)
        report = rank.communicate(timeout=30)[0].strip()
    finally:
        rank.kill()
        rank.wait()
    assert report.startswith("stalled") and "rank(s) 1 fell behind" in report, report
