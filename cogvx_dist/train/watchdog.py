"""The progress watchdog: a thread in every rank that ends the job when it cannot go on.

- A peer failed: any rank's failure record (output_dir/failures/) newer than this rank's start ends this rank
  within about a second. A peer blocked in a collective cannot notice a lost peer by itself (DeepSpeed's CPU
  shared-memory all-reduce has no timeout; NCCL waits for its timeout), and a signal handler never runs while the
  main thread is inside such a call, so the record is the job's error flag.
- No progress: the watchdog notices a job making no progress and ends it, naming the ranks that did not reach the
  step and leaving every reachable rank's Python stacks in output_dir/stacks/.
- A host out of reach: when a network cut leaves every rank waiting in the same collective, every heartbeat stays
  fresh and no rank falls behind, so the check above cannot tell a cut from a slow step; the watchdog asks the
  network instead, early (see below), and ends the job naming the host it cannot reach.

Each rank writes a heartbeat (host, pid, last completed step) every few seconds. When no step (or checkpoint)
has completed for distributed.stall_timeout_s, the watchdog of a waiting rank: dumps its own stacks; asks the ranks
on its host to dump theirs (SIGUSR2, registered with faulthandler; SIGCONT wakes a stopped one so it can); names
the ranks whose heartbeat is behind; records the stall; kills those on its host; and exits with code 76. A
collective blocked in C++ cannot be interrupted from Python, which is why this runs in its own thread.

The network check (distributed.network_stall_floor_s, network_stall_factor): each rank records in its heartbeat the
address its host uses toward MASTER_ADDR and the port of a listening socket the watchdog holds open. A rank that
has completed no step or checkpoint for longer than max(floor, factor x the slowest step measured in this launch)
connects to every other host (one rank's address and port each, all at once, PROBE_TIMEOUT_S) and again every
PROBE_EVERY_S while the wait lasts. An answer, a refusal included, means the host is up and reachable; a timeout or
"no route" means it is not: the rank records which host it cannot reach, kills the other ranks of its host and
exits 76. The ranks on the other side of the cut do the same, so every host of the job ends within the bound plus
a probe. A wait with every host reachable (a long evaluation, a slow save) is left to stall_timeout_s.
"""

from __future__ import annotations

import errno
import faulthandler
import functools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cogvx_dist.core.faults import delay_hook
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.run_folder import FAILURES, HEARTBEATS, RunFolder

POLL_S = 1.0
"""How often a rank looks for a peer's failure record."""

STACK_SIGNAL = signal.SIGUSR2
PROBE_TIMEOUT_S = 5.0
"""How long one connection attempt to another host may take before the host counts as out of reach (TCP retries
its SYN within it, so one lost packet does not count)."""
PROBE_EVERY_S = 15.0
"""How often a rank past the network bound tries the other hosts again while every one of them answers."""
REACHABLE_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET)
"""A host that refuses or resets the connection answered: it is up and the link to it works."""


def network_stall_bound(floor_s: float, factor: float, slowest_step_s: float) -> float:
    """Seconds without a completed step (or checkpoint) after which a rank checks that it can reach every other
    host: the floor, or `factor` slowest steps of this launch if that is longer."""
    return max(floor_s, factor * slowest_step_s)


def route_address(host: str | None, port: int) -> str | None:
    """The address of this host on its route to `host` (MASTER_ADDR): what other hosts can reach it at. No packet is
    sent (connecting a UDP socket only picks the route). None if there is no such route or no `host`."""
    if not host:
        return None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port or 1, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0])
    except OSError:
        return None


def probe_listener() -> socket.socket:
    """A listening socket on every local address (IPv6 and IPv4 where the host has both) and a free port, never
    read: the kernel completes other hosts' connection attempts, which is all a probe asks."""
    if socket.has_dualstack_ipv6():
        try:
            listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128)
        except OSError:
            listener = socket.create_server(("", 0), backlog=128)
    else:
        listener = socket.create_server(("", 0), backlog=128)
    listener.setblocking(False)
    return listener


def unreachable(targets: list[tuple[str, int]], timeout_s: float = PROBE_TIMEOUT_S) -> dict[tuple[str, int], str]:
    """The (address, port) targets that do not answer a TCP connection within `timeout_s`, with the reason; all
    are tried at once. A refused connection counts as an answer."""
    def attempt(target: tuple[str, int]) -> str | None:
        try:
            socket.create_connection(target, timeout=timeout_s).close()
            return None
        except TimeoutError:
            return f"no answer in {timeout_s:g} s"
        except OSError as err:
            if err.errno in REACHABLE_ERRNOS:
                return None
            return err.strerror or str(err)

    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(targets)), thread_name_prefix="cogvx-probe") as pool:
        reasons = list(pool.map(attempt, targets))
    return {target: reason for target, reason in zip(targets, reasons) if reason is not None}


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
                 tick: Callable[[], None] | None = None, network_floor_s: float = 0.0,
                 network_factor: float = 0.0) -> None:
        self.run = RunFolder(output_dir)
        self.rank, self.world_size = rank, world_size
        self.stall_timeout_s = stall_timeout_s
        self.network_floor_s, self.network_factor = network_floor_s, network_factor
        self.slowest_step_s = 0.0
        """The longest time between two progress calls after this launch's first step."""
        self._measuring = False
        self._next_probe = 0.0
        self.host = socket.gethostname()
        port = os.environ.get("MASTER_PORT", "")
        self.address = route_address(os.environ.get("MASTER_ADDR"), int(port) if port.isdigit() else 0)
        self._listener: socket.socket | None = None
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
        if self.network_floor_s and self.address:
            try:
                self._listener = probe_listener()
            except OSError:
                pass  # no port to listen on: other hosts do not judge this one, and the run goes on
        self._beat()
        self._thread.start()
        return self

    def progress(self, step: int) -> None:
        now = time.monotonic()
        # Start-up, the restore and the launch's first step (loader start, compilation, the first evaluation) are
        # not what a step takes; from there on each interval, a checkpoint's included, widens the network bound.
        if self._measuring:
            self.slowest_step_s = max(self.slowest_step_s, now - self.last_progress)
        elif step > 0:
            self._measuring = True
        self.step = step
        self.last_progress = now

    def network_bound_s(self) -> float:
        """The wait after which this rank checks that every other host is reachable (see the module docstring)."""
        return network_stall_bound(self.network_floor_s, self.network_factor, self.slowest_step_s)

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()

    def _beat(self) -> None:
        beat = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self.step, "time": time.time()}
        if self._listener is not None:
            beat.update(address=self.address, probe_port=self._listener.getsockname()[1])
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
            self._drain_probes()
            idle = time.monotonic() - self.last_progress
            if (self._listener is not None and idle > self.network_bound_s()
                    and time.monotonic() >= self._next_probe):
                cut = self._unreachable_hosts()
                self._next_probe = time.monotonic() + PROBE_EVERY_S
                idle = time.monotonic() - self.last_progress
                if cut and idle > self.network_bound_s():  # a step may have completed during the probe
                    message, local_pids = self._network_report(idle, cut)
                    self.on_stall(message, functools.partial(self._kill, local_pids))
                    return
            # Judged before this rank beats again: a rank that was itself stopped (and is running again because
            # the waiting rank woke it to dump its stacks) still has its stale heartbeat on disk, so it names itself.
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

    def _drain_probes(self) -> None:
        """Close the connections other hosts' probes left queued, so that the queue never fills."""
        while self._listener is not None:
            try:
                self._listener.accept()[0].close()
            except OSError:  # nothing queued (BlockingIOError), or the listener closed by stop()
                return

    def _unreachable_hosts(self) -> dict[str, dict[str, Any]]:
        """Other hosts of this job that do not answer a connection: by host name, their address, the reason and
        their ranks. Hosts whose ranks recorded no address (no MASTER_ADDR) are not judged."""
        hosts: dict[str, dict[str, Any]] = {}
        for rank, beat in sorted(read_heartbeats(self.run.root).items()):
            host = beat.get("host")
            if rank >= self.world_size or host == self.host or not beat.get("address") or not beat.get("probe_port"):
                continue  # a higher rank's file is an earlier, larger launch's
            entry = hosts.setdefault(host, {"target": (beat["address"], int(beat["probe_port"])), "ranks": []})
            entry["ranks"].append(rank)
        reasons = unreachable([entry["target"] for entry in hosts.values()])
        return {host: {**entry, "reason": reasons[entry["target"]]} for host, entry in hosts.items()
                if entry["target"] in reasons}

    def _network_report(self, idle: float, cut: dict[str, dict[str, Any]]) -> tuple[str, list[int]]:
        """Dump stacks here and on this host's other ranks; the one-line cause and every other local rank's pid
        (all of them wait behind the same cut)."""
        local = self._dump_stacks(f"waited {idle:.0f} s at step {self.step} with a host out of reach",
                                  read_heartbeats(self.run.root))
        hosts = "; ".join(f"{host} ({entry['target'][0]}, rank{'s' if len(entry['ranks']) > 1 else ''} "
                          f"{', '.join(map(str, entry['ranks']))}): {entry['reason']}" for host, entry in cut.items())
        message = (f"network: host {self.host} ({self.address}) cannot reach {hosts}; no step completed for "
                   f"{idle:.0f} s, past the bound of {self.network_bound_s():.0f} s (the larger of "
                   f"distributed.network_stall_floor_s {self.network_floor_s:g} and distributed.network_stall_factor "
                   f"{self.network_factor:g} x the slowest step, {self.slowest_step_s:.1f} s); stacks in "
                   f"{self.run.stacks(self.rank).parent}")
        return message, list(local.values())

    def _dump_stacks(self, headline: str, beats: dict[int, dict[str, Any]]) -> dict[int, int]:
        """Dump this rank's stacks and ask this host's other ranks (from their heartbeats) to dump theirs; their pids
        by rank."""
        stacks = self.run.stacks(self.rank)
        with open(stacks, "a") as handle:
            handle.write(f"--- rank {self.rank} {headline} ---\n")
            handle.flush()
            faulthandler.dump_traceback(file=handle, all_threads=True)
        local = {r: int(b["pid"]) for r, b in beats.items()
                 if r != self.rank and r < self.world_size and b.get("host") == self.host and "pid" in b}
        for pid in local.values():
            _signal(pid, STACK_SIGNAL)
            _signal(pid, signal.SIGCONT)  # a stopped rank dumps once it runs again
        time.sleep(min(2.0, self.interval_s))
        return local

    def _stall_report(self, idle: float) -> tuple[str, list[int]]:
        """Dump stacks here and on this host's other ranks; the one-line cause and the lagging local ranks' pids."""
        stacks = self.run.stacks(self.rank)
        beats = read_heartbeats(self.run.root)  # before any woken rank beats again
        lagging = lagging_ranks(beats, self.world_size, 3 * self.interval_s)  # this rank too, if it was stopped
        local = self._dump_stacks(f"stalled at step {self.step} after {idle:.0f} s", beats)
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
