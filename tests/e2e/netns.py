"""Two hosts on one machine for network fault tests: two Linux network namespaces joined by a veth pair (a cable),
each with its own address and, for every process started on it, its own host name (a UTS namespace) and an
/etc/hosts that resolves both names to their addresses, as a cluster's DNS does (gloo finds its own address that
way). They share this machine's filesystem, so a run folder on it is a shared one, and its process table.

Needs root and iproute2 (`ip netns`, and `tc` for throttling); `HostPair.make` raises Unavailable with the reason
otherwise. Names hold the pid and a counter, so parallel test workers never meet; `close()` kills what runs in the
namespaces and removes them, whatever state a failed test left them in.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
"""`ip netns exec NAME` bind-mounts the files of /etc/netns/NAME/ over /etc/ for the command it runs."""
_COUNTER = itertools.count()


class Unavailable(Exception):
    """Namespaces cannot be made here (not root, no iproute2, or the kernel refuses)."""


@dataclass(frozen=True)
class Host:
    name: str
    """Host name inside, and the network namespace's name."""
    address: str
    device: str = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


class HostPair:
    """Hosts 0 and 1 on a /24 of 10.213.0.0/16, joined by one link."""

    def __init__(self, hosts: tuple[Host, Host]) -> None:
        self.hosts = hosts

    @classmethod
    def make(cls, tag: str) -> HostPair:
        """Two connected hosts named cgx-TAG-PID-N-{0,1}; Unavailable if this machine cannot make them."""
        if os.geteuid() != 0:
            raise Unavailable(f"network namespaces need root (`ip netns add`); running as uid {os.geteuid()}")
        for tool in ("ip", "unshare"):
            if shutil.which(tool) is None:
                raise Unavailable(f"no `{tool}` command (iproute2 / util-linux)")
        number = next(_COUNTER)
        subnet = f"10.213.{(os.getpid() + 37 * number) % 250 + 1}"
        base = f"cgx-{tag}-{os.getpid()}-{number}"
        pair = cls((Host(f"{base}-0", f"{subnet}.1"), Host(f"{base}-1", f"{subnet}.2")))
        try:
            pair._build()
        except BaseException:
            pair.close()
            raise
        return pair

    def _build(self) -> None:
        first, second = self.hosts
        for host in self.hosts:
            _ip("netns", "add", host.name)
        # Both ends are made inside their namespaces, so the device names never meet in this one.
        _ip("link", "add", first.device, "netns", first.name, "type", "veth", "peer", "name", second.device,
            "netns", second.name)
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts)
        for host in self.hosts:
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.device)
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip("-n", host.name, "link", "set", host.device, "up")
            (NETNS_ETC / host.name).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.name / "hosts").write_text(hosts_file)

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """`argv` as run on `host`: in its network namespace, under its own host name."""
        return ["ip", "netns", "exec", host.name, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                host.name, *argv]

    def cut(self) -> None:
        """Pull the cable: host 0's end goes down, host 1 sees no carrier; connections in flight stay open and hang."""
        _ip("-n", self.hosts[0].name, "link", "set", self.hosts[0].device, "down")

    def restore(self) -> None:
        _ip("-n", self.hosts[0].name, "link", "set", self.hosts[0].device, "up")

    def throttle(self, rate: str) -> None:
        """Limit both directions to `rate` (a token bucket; this kernel has no netem)."""
        if shutil.which("tc") is None:
            raise Unavailable("no `tc` command (iproute2) to throttle the link")
        for host in self.hosts:
            result = subprocess.run(["ip", "netns", "exec", host.name, "tc", "qdisc", "add", "dev", host.device,
                                     "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise Unavailable(f"tc cannot throttle the link: {result.stderr.strip()}")

    def shaped(self, host: Host) -> tuple[int, int]:
        """(bytes sent, times the rate held a packet back) by `host`'s throttle so far."""
        result = subprocess.run(["ip", "netns", "exec", host.name, "tc", "-s", "qdisc", "show", "dev", host.device],
                                capture_output=True, text=True, check=True)
        match = re.search(r"Sent (\d+) bytes .*overlimits (\d+)", result.stdout)
        assert match, result.stdout
        return int(match.group(1)), int(match.group(2))

    def pids(self, host: Host) -> list[int]:
        """Processes running on `host` (in its network namespace)."""
        result = _ip("netns", "pids", host.name, check=False)
        return [int(pid) for pid in result.stdout.split()]

    def close(self) -> None:
        """Kill whatever still runs on either host, then remove both (the link goes with them)."""
        for host in self.hosts:
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while any(self.pids(host) for host in self.hosts) and time.monotonic() < deadline:
            time.sleep(0.1)
        for host in self.hosts:
            _ip("netns", "del", host.name, check=False)
            shutil.rmtree(NETNS_ETC / host.name, ignore_errors=True)
