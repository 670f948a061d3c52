"""Elastic training on real hosts: three network-namespace hosts, one rank each, torchrun's elastic agent on every
one (launchers/train_torchrun.sh, NNODES=2:3, c10d rendezvous on host 0). Every process of host 2 is killed
mid-run; the two others go on from the last committed checkpoint at world size 2; host 2's agent starts again and
the job grows back to 3. The training equals an uninterrupted 3-rank run: the same samples at every global step, the
same losses and final adapter within 1e-5 relative (the reduction order changes with the world size).

The hosts: one namespace per host (its own address, host name and /etc/hosts, as a cluster's DNS gives, the way
tests/e2e/netns.py makes its pair) joined by a bridge in a fourth namespace, so this machine's own network is never
touched. They share the filesystem (the run
folder is a shared one) and the process table. Needs root and iproute2; skipped, saying why, otherwise.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.netns import NETNS_ETC, Unavailable
from tests.helpers import REPO, clean_env, free_port, read_adapter, write_config

LAUNCHERS = REPO / "launchers"
TORCHRUN = Path(sys.executable).parent / "torchrun"
RECOVERY_BOUND_S = 90.0
"""From the SIGKILL of host 2 to the first step the two survivors log: the agents' failure detection (gloo sees the
closed connections at once), the new rendezvous round (a 2 s last call) and the workers' start (~20 s of imports
and DeepSpeed set-up on this 2-core machine under load)."""
RTOL = 1e-5
_COUNTER = itertools.count()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


class Hosts:
    """N hosts on a /24 of 10.214.0.0/16, each a network namespace with eth0 on a bridge in a hub namespace."""

    def __init__(self, count: int) -> None:
        number = next(_COUNTER)
        self.base = f"cgxel-{os.getpid()}-{number}"
        self.hub = f"{self.base}-hub"
        subnet = f"10.214.{(os.getpid() + 37 * number) % 250 + 1}"
        self.names = [f"{self.base}-{i}" for i in range(count)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(count)]
        self.made: list[str] = []

    def build(self) -> None:
        for name in (self.hub, *self.names):
            _ip("netns", "add", name)
            self.made.append(name)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in zip(self.names, self.addresses))
        for i, (name, address) in enumerate(zip(self.names, self.addresses)):
            _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"port{i}", "netns", self.hub)
            _ip("-n", self.hub, "link", "set", f"port{i}", "master", "br0")
            _ip("-n", self.hub, "link", "set", f"port{i}", "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "link", "set", "eth0", "up")
            (NETNS_ETC / name).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / name / "hosts").write_text(hosts_file)

    def start(self, host: int, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """`argv` on host `host`: in its namespace, under its own host name, in a session of its own."""
        name = self.names[host]
        return subprocess.Popen(["ip", "netns", "exec", name, "unshare", "--uts", "sh", "-c",
                                 'hostname "$0" && exec "$@"', name, *argv], env=env, cwd=REPO,
                                stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self, host: int) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", self.names[host]], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]

    def kill(self, host: int) -> int:
        """SIGKILL every process on `host` (its agent and its worker); how many there were."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def close(self) -> None:
        for host in range(len(self.names)):
            if self.names[host] in self.made:
                self.kill(host)
        deadline = time.monotonic() + 10
        while any(self.pids(h) for h in range(len(self.names)) if self.names[h] in self.made) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        for name in self.made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (`ip netns add`); running as uid {os.geteuid()}")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"no `{tool}` command (iproute2 / util-linux) to make hosts")
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun at {TORCHRUN}")
    made = Hosts(3)
    try:
        made.build()
    except Unavailable as err:
        made.close()
        pytest.skip(f"this machine cannot make network namespaces: {err}")
    yield made
    made.close()


@pytest.fixture(scope="module")
def shards(synthetic_shards):
    return synthetic_shards((3, 2, 2))  # 7 samples: more than one global batch of 6


def _config(folder: Path, model: Path, shards: Path, stage: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "run"
    config = write_config(folder / "run.yaml", model, shards, output,
                          train={"max_steps": 24, "global_batch_size": 6, "grad_accum_steps": 1},
                          deepspeed={"config": stage}, checkpoint={"every_steps": 3, "keep_last": 2},
                          log={"progress_bar": False, "sample_trace": True, "tensorboard": False})
    return config, output


def _metrics(output: Path) -> list[dict]:
    from cogvx_dist.core.metric_table import read_metrics

    return read_metrics(output)


def _launches(output: Path) -> list[dict]:
    from cogvx_dist.train.membership import read_launches

    return read_launches(output)


def _start_agent(hosts, node: int, config: Path, env: dict, log: Path) -> subprocess.Popen:
    """launchers/train_torchrun.sh on host `node`, its output to `log`."""
    return hosts.start(node, ["bash", str(LAUNCHERS / "train_torchrun.sh"), str(config)], env, log)


def _start_agents(hosts, config: Path, tmp_path: Path,
                  join_timeout: int) -> tuple[dict, list[Path], list[subprocess.Popen]]:
    """A torchrun agent on each of the 3 hosts (NNODES=2:3, c10d rendezvous on host 0), with steps slow enough to
    kill and rejoin mid-run: (their environment, their logs, the agents)."""
    from cogvx_dist.core.faults import FAULT_ENV

    port = free_port()
    env = clean_env(NNODES="2:3", GPUS_PER_NODE="1", MASTER_ADDR=hosts.addresses[0], MASTER_PORT=str(port),
                    RDZV_ID=f"elastic-{port}", CHECK="0", MAX_RESTARTS="3", TORCHRUN=str(TORCHRUN),
                    TMPDIR=str(tmp_path), GLOO_SOCKET_IFNAME="eth0",
                    RDZV_CONF=f"join_timeout={join_timeout},last_call_timeout=2,keep_alive_interval=1,"
                              "keep_alive_max_attempt=3",
                    **{FAULT_ENV: "train.step_delay_ms=400"})
    logs = [tmp_path / f"host-{i}.log" for i in range(3)]
    return env, logs, [_start_agent(hosts, i, config, env, logs[i]) for i in range(3)]


def _wait(what: str, done, procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> float:
    started = time.monotonic()
    while not done():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() - started > timeout:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
            pytest.fail(f"waiting for {what}: {'an agent exited' if dead else 'timed out'}\n{tails}")
        time.sleep(0.2)
    return time.monotonic() - started


def step_keys(output: Path) -> dict[int, list[str]]:
    """The samples of each global step in unit order (micro-step x world size + rank), from the per-rank traces: a
    step trained more than once (redone after a lost node) counts as its last launch trained it."""
    launches = _launches(output)
    traces = {}
    for path in sorted((output / "trace").glob("rank-*.jsonl")):
        last: dict[tuple[int, int], list[str]] = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            last[(record["step"], record["micro_step"])] = record["keys"]
        traces[int(path.stem.split("-")[1])] = last
    steps = sorted({step for trace in traces.values() for step, _ in trace})
    by_step = {}
    for step in steps:
        world = [launch for launch in launches if launch["resumed_from_step"] < step][-1]["world_size"]
        units = {}
        for rank in range(world):
            for (s, micro), keys in traces[rank].items():
                if s == step:
                    units[micro * world + rank] = keys
        by_step[step] = [key for unit in sorted(units) for key in units[unit]]
    return by_step


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_lost_node_shrinks_the_job_and_its_return_grows_it(hosts, shards, tmp_path, stage):

    model, shard_dir = shards
    # The uninterrupted reference: 3 ranks under torchrun on this host (one rank per node or not, the same math).
    ref_config, ref_output = _config(tmp_path / "ref", model, shard_dir, stage)
    reference = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "3", "-m", "cogvx_dist.train",
                                "--config", str(ref_config)], cwd=REPO, capture_output=True, text=True,
                               timeout=600, env=clean_env(TMPDIR=str(tmp_path)))
    assert reference.returncode == 0, reference.stderr[-4000:]

    config, output = _config(tmp_path / "elastic", model, shard_dir, stage)
    env, logs, agents = _start_agents(hosts, config, tmp_path, join_timeout=300)

    def logged(world: int, after: int = 0):
        return lambda: any(r.get("world_size") == world and r["step"] > after for r in _metrics(output))

    _wait("5 steps at world size 3", lambda: logged(3, 4)(), agents, logs, 600)
    assert hosts.kill(2) >= 2  # the agent and its worker, at least
    killed_at = time.monotonic()
    killed_step = _metrics(output)[-1]["step"]
    recovered = _wait("the survivors' first step at world size 2", logged(2), agents[:2], logs, 600)
    assert recovered < RECOVERY_BOUND_S, f"the survivors took {recovered:.0f} s to go on"
    shrink = _launches(output)[-1]
    assert shrink["world_size"] == 2 and shrink["previous_world_size"] == 3
    assert shrink["resumed_from_step"] % 3 == 0 and shrink["resumed_from_step"] <= killed_step  # the last commit
    # The rows of step killed_step + 1 may have been written just after the kill was read back.
    assert shrink["steps_redone"] - (killed_step - shrink["resumed_from_step"]) in (0, 1)

    agents[2] = _start_agent(hosts, 2, config, env, logs[2])
    _wait("the job to grow back to 3", lambda: _launches(output)[-1]["world_size"] == 3, agents, logs, 600)
    for agent in agents:
        agent.wait(timeout=600)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert [agent.returncode for agent in agents] == [0, 0, 0], tails
    grow = _launches(output)[-1]
    assert grow["previous_world_size"] == 2 and grow["world_size"] == 3
    # The grown job resumed a commit of the 2-rank job (the one its restart's SIGTERM made, if no other): under
    # ZeRO-3 the adapter's 256-element matrices, saved in halves, are cut into thirds that do not divide evenly, where
    # DeepSpeed's set_full_hp_param once cut the last rank's piece past the end and every restart failed.
    assert grow["resumed_from_step"] > shrink["resumed_from_step"], _launches(output)
    worlds = [r["world_size"] for r in _metrics(output)]
    assert 2 in worlds and worlds[-1] == 3 and len(worlds) == 24
    print(f"recovered in {recovered:.1f} s after the kill at step {killed_step}; membership: {_launches(output)}; "
          f"total {time.monotonic() - killed_at:.0f} s from the kill")

    # The same training as the uninterrupted run.
    assert step_keys(output) == step_keys(ref_output)
    elastic_loss = {r["step"]: r["loss"] for r in _metrics(output)}
    ref_loss = {r["step"]: r["loss"] for r in _metrics(ref_output)}
    assert elastic_loss.keys() == ref_loss.keys()
    far = {s: (elastic_loss[s], ref_loss[s]) for s in ref_loss if not _close(elastic_loss[s], ref_loss[s])}
    assert not far, f"losses differ beyond {RTOL:g} relative: {far}"
    # Bit-identity where the world size never changed: the steps before the first kill's checkpoint.
    for step in range(1, shrink["resumed_from_step"] + 1):
        assert elastic_loss[step] == ref_loss[step]
    final, ref_final = read_adapter(output / "lora"), read_adapter(ref_output / "lora")
    assert final.keys() == ref_final.keys()
    for name, tensor in ref_final.items():
        scale = tensor.abs().max().item() or 1.0
        assert (final[name] - tensor).abs().max().item() <= RTOL * scale, name



@pytest.mark.slow
def test_losing_the_rendezvous_host_ends_the_job_on_the_others(hosts, shards, tmp_path):
    """What docs/CLUSTER.md says of the one host an elastic job cannot lose: when every process of host 0 (torchrun's
    rendezvous store) is killed, the agents on hosts 1 and 2 do not wait for it but exit with an error within a
    bound, leaving the last commit for the scheduler's restart (Slurm requeue, Kubernetes recreating the pods)."""
    from cogvx_dist.core.run_folder import RunFolder

    model, shard_dir = shards
    config, output = _config(tmp_path, model, shard_dir, "zero2")
    env, logs, agents = _start_agents(hosts, config, tmp_path, join_timeout=60)
    _wait("a commit at world size 3", lambda: bool(RunFolder(output).complete_checkpoints()), agents, logs, 600)
    hosts.kill(0)
    killed_at = time.monotonic()
    for agent in agents[1:]:
        agent.wait(timeout=RENDEZVOUS_LOSS_BOUND_S)
    ended = time.monotonic() - killed_at
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs[1:])
    assert all(agent.returncode not in (0, None) for agent in agents[1:]), tails
    assert [launch["world_size"] for launch in _launches(output)] == [3]  # no world without its store
    assert RunFolder(output).complete_checkpoints()  # what the restart resumes from
    print(f"hosts 1 and 2 ended {ended:.1f} s after host 0 was killed")


RENDEZVOUS_LOSS_BOUND_S = 120.0
"""From the SIGKILL of host 0 to the exit of the other agents: their ranks fail at once on the closed connections;
the agents then fail to reach the rendezvous store (torchrun retries its store connection for a while first)."""


@pytest.mark.slow
def test_every_minutes_saves_on_rank_zeros_clock(shards, tmp_path):
    """checkpoint.every_minutes with every_steps out of reach: the ranks save whenever rank 0's clock says so (each
    save is a collective, so ranks that disagreed would hang in it), so more than the last step is saved."""
    from cogvx_dist.core.faults import FAULT_ENV
    from cogvx_dist.core.run_folder import RunFolder
    from tests.helpers import launch

    model, shard_dir = shards
    config, output = _config(tmp_path, model, shard_dir, "zero2")
    result = launch(config, 2, "train.max_steps=8", "checkpoint.every_steps=1000", "checkpoint.keep_last=20",
                    "checkpoint.every_minutes=0.01", env=clean_env(**{FAULT_ENV: "train.step_delay_ms=300"}))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = [step for step, _ in RunFolder(output).complete_checkpoints()]
    assert saved[-1] == 8 and len(saved) >= 2, saved  # without every_minutes: step 8 alone
