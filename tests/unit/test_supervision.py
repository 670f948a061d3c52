"""The pieces that let a job end truthfully when a process of it is killed, on real processes: /proc's view of a
dead one, a rank's supervision of `cogvx train` and of its launcher, the runner's parent-death signal, the dead
peers a survivor lists and the verdict drawn from the records. (Whole jobs: tests/e2e/test_faults.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cogvx_dist.core.launch_env import SUPERVISOR_ENV, Supervisor, env_supervisor, this_supervisor
from cogvx_dist.core.process import describe_wait_status, process_alive, process_stat, signal_in_exit_code
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train import failures
from tests.helpers import REPO, clean_env

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def zombie(signum: int | None = signal.SIGKILL, code: int = 0) -> subprocess.Popen:
    """A child that ended (killed by `signum`, or exited with `code`) and is not reaped yet."""
    child = subprocess.Popen([sys.executable, "-c", f"import time, sys; time.sleep({60 if signum else 0}); "
                              f"sys.exit({code})"])
    if signum:
        child.send_signal(signum)
    wait_until(lambda: process_stat(child.pid).state == "Z", "the child never ended")
    return child


@pytest.mark.parametrize("signum, code, said", [(signal.SIGKILL, 0, "killed by SIGKILL"),
                                                (None, 3, "exited with code 3")])
def test_proc_tells_how_an_unreaped_process_ended(signum, code, said):
    child = zombie(signum, code)
    try:
        stat = process_stat(child.pid)
        assert stat.ended and not process_alive(child.pid)
        assert describe_wait_status(stat.wait_status) == said
    finally:
        child.wait()
    assert process_stat(child.pid) is None


def test_a_pid_with_another_start_time_is_another_process():
    me = this_supervisor()
    assert (me.host, me.pid) == (socket.gethostname(), os.getpid())
    assert process_alive(me.pid, me.start_ticks) and not process_alive(me.pid, me.start_ticks + 1)
    assert env_supervisor({SUPERVISOR_ENV: str(me)}) == me
    assert env_supervisor({SUPERVISOR_ENV: "host 12"}) is None and env_supervisor({}) is None


def test_a_launcher_exit_code_names_the_signal_that_killed_its_rank():
    assert signal_in_exit_code(256 - 9) == "SIGKILL" and signal_in_exit_code(256 - 15) == "SIGTERM"
    assert [signal_in_exit_code(code) for code in (0, 1, 2, 75, 76, 77, 86, 137)] == [None] * 8


RANK = """
import sys, time
from cogvx_dist.train.supervision import Supervision
seen = []
watch = Supervision(seen.append, poll_s=0.05).start()
print("watching", flush=True)
while not seen:
    time.sleep(0.01)
print("lost", seen[0], flush=True)
"""

LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(rank.pid, flush=True)
rank.wait()
"""


@pytest.mark.parametrize("victim", ["supervisor", "launcher"])
def test_a_rank_sees_its_supervisor_or_its_launcher_killed(tmp_path, victim):
    """A real 'launcher' process starts a real 'rank' that watches a real 'cogvx train' (here a sleeping process
    named in COGVX_SUPERVISOR): SIGKILL of either is seen, and named, within a fraction of a second."""
    supervisor = subprocess.Popen(["sleep", "60"])
    identity = Supervisor(socket.gethostname(), supervisor.pid, process_stat(supervisor.pid).start_ticks)
    out = tmp_path / "rank.out"
    env = clean_env(LOCAL_RANK="0", **{SUPERVISOR_ENV: str(identity)})
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK], cwd=REPO, env=env,
                                stdout=open(out, "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "watching" in out.read_text(), out.read_text())
        rank = int(out.read_text().split()[0])
        (supervisor if victim == "supervisor" else launcher).send_signal(signal.SIGKILL)
        wait_until(lambda: "lost" in out.read_text(), out.read_text())
        expected = (f"lost cogvx train (pid {supervisor.pid} on " if victim == "supervisor"
                    else f"lost the per-node launcher (pid {launcher.pid} on ")
        assert expected in out.read_text(), out.read_text()
        wait_until(lambda: not process_alive(rank), "the rank did not end")
    finally:
        for process in (supervisor, launcher):
            process.kill()
            process.wait()


def test_a_rank_without_launcher_or_supervisor_watches_nothing():
    from cogvx_dist.train.supervision import Supervision

    assert not Supervision(lambda what: None, env={}).watching
    assert Supervision(lambda what: None, env={"LOCAL_RANK": "0"}).watching


PARENT = """
import subprocess, time
from cogvx_dist.core.process import die_with_parent
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(60)
"""


def test_the_runner_gets_sigterm_when_cogvx_train_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    wait_until(lambda: not process_alive(child), "the child outlived its parent")


def beat(run: RunFolder, rank: int, pid: int) -> None:
    run.heartbeat(rank).parent.mkdir(parents=True, exist_ok=True)
    run.heartbeat(rank).write_text(json.dumps({"rank": rank, "host": socket.gethostname(), "pid": pid, "step": 3,
                                               "time": time.time()}))


def test_a_survivor_lists_the_peers_of_its_host_that_died(tmp_path):
    run = RunFolder(tmp_path)
    dead, alive = zombie(), subprocess.Popen(["sleep", "60"])
    try:
        beat(run, 0, os.getpid())
        beat(run, 1, dead.pid)
        beat(run, 2, alive.pid)
        assert failures.gone_peers(tmp_path, 0) == [{"rank": 1, "host": socket.gethostname(), "pid": dead.pid,
                                                      "how": "killed by SIGKILL"}]
        failures.record_failure(tmp_path, 0, "RuntimeError: Connection closed by peer", failures.EXIT_FAILED,
                                failures.SECONDARY)
        record = json.loads(run.failure(0).read_text())
        assert [peer["rank"] for peer in record["gone"]] == [1]
    finally:
        dead.wait()
        alive.kill()
        alive.wait()


def record(rank: int, kind: str, message: str, gone: list | None = None, at: float = 0.0) -> dict:
    return {"rank": rank, "host": "node-a", "pid": 100 + rank, "time": at, "exit_code": 1, "kind": kind,
            "message": message, "gone": gone or []}


def test_the_verdict_names_the_rank_that_died_without_a_record():
    lost = "RuntimeError: Connection closed by peer"
    dead = {"rank": 1, "host": "node-a", "pid": 101, "how": ""}
    line, code = failures.verdict([record(0, failures.SECONDARY, lost, [dead])])
    assert code == failures.EXIT_FAILED
    assert line.startswith("rank 1 (node-a, pid 101) ended the job: its process died without a record (killed by a "
                           "signal such as SIGKILL"), line
    assert "rank 0 then lost its connection to it (RuntimeError: Connection closed by peer)" in line
    line, _ = failures.verdict([record(0, failures.SECONDARY, lost, [{**dead, "how": "killed by SIGKILL"}])])
    assert "died without a record (killed by SIGKILL)" in line
    # A primary record comes first; a rank gone with a record of its own is not a silent death.
    primary = record(1, failures.PRIMARY, "ValueError: bad", at=5.0)
    assert failures.verdict([primary, record(0, failures.SECONDARY, lost, [dead])])[0].startswith(
        "rank 1 (node-a) ended the job: ValueError: bad")
    line, _ = failures.verdict([record(0, failures.SECONDARY, lost, [dead]), record(1, failures.SECONDARY, lost)])
    assert line.startswith("rank 0 (node-a) lost a peer") and "another host" in line, line
    assert failures.verdict([]) is None


def test_without_a_witness_the_launcher_s_signal_points_at_this_host_s_silent_rank():
    """The dead rank alone on its host: no survivor saw its process end, but that host's launcher reported a rank
    killed by SIGKILL, and of that host's ranks only one left no record."""
    here = socket.gethostname()
    remote = {**record(0, failures.SECONDARY, "RuntimeError: Connection closed by peer"), "host": "node-b"}
    line, code = failures.verdict([remote], "SIGKILL", [1])
    assert code == failures.EXIT_FAILED
    assert line == (f"rank 1 ({here}) ended the job: killed by SIGKILL without a record, as this host's launcher "
                    "reported; rank 0 lost its connection to it (RuntimeError: Connection closed by peer)"), line
    assert failures.verdict([], "SIGKILL", [2, 3])[0].startswith(f"one of ranks 2, 3 ({here}) ended the job")
    assert failures.verdict([], None, [2]) is None and failures.verdict([], "SIGKILL", []) is None
