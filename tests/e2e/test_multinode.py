"""Multi-node training simulated on one machine: two node launchers (launchers/train_node.sh, which runs
`cogvx train --node-rank`, i.e. `deepspeed --no_ssh`) on loopback, and mpiexec with DeepSpeed's MPI discovery
(launchers/train_mpi.sh). Prep under `mpiexec -n 2` is in test_prep_ranks.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, clean_env, communicate_all, free_port, shared_folder, short_run_config, summary_of

LAUNCHERS = REPO / "launchers"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> tuple[Path, Path]:
    return synthetic_shards((3, 2, 2))  # 7 samples


@pytest.fixture(scope="module")
def two_node_run(shards, tmp_path_factory) -> dict[str, Any]:
    """Two nodes simulated by two `launchers/train_node.sh` (deepspeed --no_ssh, node ranks 0 and 1, one rank
    each) on loopback, started in parallel, with the script writing its own hostfile and running the precheck."""
    deepspeed = BIN / "deepspeed"
    if not deepspeed.exists():
        pytest.skip("no deepspeed console script next to the interpreter")

    def train(folder: Path) -> None:
        config, _ = short_run_config(folder, *shards)
        port = free_port()
        procs = [
            subprocess.Popen(["bash", str(LAUNCHERS / "train_node.sh"), str(config)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             env=clean_env(NODE_RANK=str(node), NNODES="2", GPUS_PER_NODE="1",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DEEPSPEED=str(deepspeed),
                                           TMPDIR=str(folder)))
            for node in (0, 1)
        ]
        outputs = communicate_all(procs, timeout=600)
        (folder / "nodes.json").write_text(json.dumps({"returncodes": [p.returncode for p in procs],
                                                       "outputs": outputs}))

    folder = shared_folder(tmp_path_factory, "two-nodes", train)  # once per session
    nodes = json.loads((folder / "nodes.json").read_text())
    return {"returncodes": nodes["returncodes"], "outputs": [tuple(pair) for pair in nodes["outputs"]],
            "output": folder / "run", "hostfile": folder / "cogvx-hostfile-2x1"}


def test_two_simulated_nodes_train_identical_adapters(two_node_run):
    for code, (_, err) in zip(two_node_run["returncodes"], two_node_run["outputs"]):
        assert code == 0, err[-4000:]
    output = two_node_run["output"]
    summary = summary_of(output)
    assert summary["world_size"] == 2 and summary["steps"] == 4
    checksums = summary["adapter_checksums"]
    assert len(checksums) == 2 and len(set(checksums)) == 1
    # Each node ran one rank: the trace files show global ranks 0 and 1 both trained every step.
    traces = sorted(p.name for p in (output / "trace").glob("rank-*.jsonl"))
    assert traces == ["rank-00000.jsonl", "rank-00001.jsonl"]
    for name in traces:
        steps = {json.loads(line)["step"] for line in (output / "trace" / name).read_text().splitlines()}
        assert steps == {1, 2, 3, 4}
    assert (output / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # The script wrote the hostfile DeepSpeed numbered the ranks from, and ran the precheck on both nodes.
    assert two_node_run["hostfile"].read_text() == "node-0 slots=1\nnode-1 slots=1\n"
    for _, err in two_node_run["outputs"]:
        assert "cogvx launch check: ok (2 nodes, 2 ranks, global batch 4, 7 samples)" in err


def test_training_under_mpiexec_with_deepspeed_mpi_discovery(two_node_run, shards, tmp_path):
    """launchers/train_mpi.sh: `mpiexec -n 2 python -m cogvx_dist.train`, ranks from DeepSpeed's MPI discovery.

    Port 29500 (DeepSpeed's discovery default) is held by this test, so the run only succeeds if the exported
    MASTER_PORT (and MASTER_ADDR=127.0.0.1) win over what discovery would pick."""
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the interpreter (pip install mpich)")
    config, output = short_run_config(tmp_path, *shards)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        blocker.bind(("0.0.0.0", 29500))
        blocker.listen()
    except OSError:
        pass  # someone else holds it: the check below still proves our port was used
    try:
        proc = subprocess.Popen(["bash", str(LAUNCHERS / "train_mpi.sh"), str(config)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                env=clean_env(NP="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                                              MPIEXEC=str(mpiexec), MPI_FLAVOR="mpich"))
        (_, err), = communicate_all([proc], timeout=300)
    finally:
        blocker.close()
    assert proc.returncode == 0, err[-4000:]
    summary = summary_of(output)
    assert summary["world_size"] == 2
    assert len(summary["adapter_checksums"]) == 2 and len(set(summary["adapter_checksums"])) == 1
    # Same config, same world size: the adapter depends only on (seed, step, rank), not on how ranks were started.
    assert summary["adapter_checksums"] == summary_of(two_node_run["output"])["adapter_checksums"]


SLOW_STEPS_SLOW_RECORD = "train.step_delay_ms=250,train.preemption_record_delay_ms=2000"
"""Steps slow enough to signal mid-run, and rank 0 slow to record the preemption (node 1's ranks must wait for it)."""


def test_sigusr1_to_every_process_of_both_nodes_checkpoints_and_exits_75(shards, tmp_path):
    """What Slurm's --signal=USR1 does to a job step: every process of every node gets SIGUSR1. Each node's
    `cogvx train` (train_node.sh execs it) passes it on; the ranks agree, commit one checkpoint and exit 75. Node 1's
    `cogvx train` reads the preemption record that rank 0 (on node 0) writes: its own rank must not leave first."""
    import time

    from cogvx_dist.core.faults import FAULT_ENV
    from cogvx_dist.core.run_folder import RunFolder
    from cogvx_dist.train.failures import EXIT_PREEMPTED

    config, output = short_run_config(tmp_path, *shards, train={"max_steps": 40})
    port = free_port()
    nodes = [subprocess.Popen(["bash", str(LAUNCHERS / "train_node.sh"), str(config)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                              env=clean_env(NODE_RANK=str(node), NNODES="2", GPUS_PER_NODE="1", CHECK="0",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=str(tmp_path),
                                            **{FAULT_ENV: SLOW_STEPS_SLOW_RECORD}))
             for node in (0, 1)]
    metrics = RunFolder(output).metrics
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes)
        time.sleep(0.1)
    for node in nodes:
        subprocess.run(["kill", "-USR1", "--", f"-{node.pid}"], check=True)
    outputs = communicate_all(nodes, timeout=120)
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == EXIT_PREEMPTED, err[-3000:]
        assert "preempted by" in err
    preempted = json.loads(RunFolder(output).preempted.read_text())
    assert [s for s, _ in RunFolder(output).complete_checkpoints()][-1] == preempted["step"]


def test_training_under_torchrun(two_node_run, shards, tmp_path):
    """launchers/train_torchrun.sh: torchrun's c10d rendezvous starts the ranks; same config, same adapter."""
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("no torchrun next to the interpreter")
    config, output = short_run_config(tmp_path, *shards)
    result = subprocess.run(["bash", str(LAUNCHERS / "train_torchrun.sh"), str(config)], cwd=REPO, text=True,
                            capture_output=True, timeout=600,
                            env=clean_env(NNODES="1", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=str(free_port()), TORCHRUN=str(torchrun)))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = summary_of(output)
    assert summary["world_size"] == 2
    assert summary["adapter_checksums"] == summary_of(two_node_run["output"])["adapter_checksums"]


def test_the_collective_timeout_bounds_a_stopped_peer_across_nodes(shards, tmp_path):
    """Between nodes the ranks talk over gloo/NCCL, where distributed.timeout_s bounds a collective (ZeRO's gradient
    reduce included): with the stall watchdog off, a stopped peer still ends the job within the timeout.

    The injected delay comes before each step, so the healthy rank next waits in ZeRO's gradient reduce, which runs
    on DeepSpeed's own copy of the world group: before that copy was given the timeout, this hung for 30 minutes."""
    import signal
    import time

    import psutil

    from cogvx_dist.core.faults import FAULT_ENV
    from cogvx_dist.core.run_folder import RunFolder

    # No checkpoint in the window: the peer is stopped during training steps, whose gradient reduce and step
    # all-reduce are the collectives under test (a checkpoint save has waits of its own; the stall watchdog, on by
    # default, covers those).
    config, output = short_run_config(tmp_path, *shards, train={"max_steps": 200}, checkpoint={"every_steps": 1000},
                                      distributed={"stall_timeout_s": 0, "timeout_s": 10})
    port = free_port()
    logs = [tmp_path / f"node-{node}.log" for node in (0, 1)]
    nodes = [subprocess.Popen(["bash", str(LAUNCHERS / "train_node.sh"), str(config)], cwd=REPO, text=True,
                              stdout=open(logs[node], "w"), stderr=subprocess.STDOUT, start_new_session=True,
                              env=clean_env(NODE_RANK=str(node), NNODES="2", GPUS_PER_NODE="1", CHECK="0",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=str(tmp_path),
                                            **{FAULT_ENV: "train.step_delay_ms=250"}))
             for node in (0, 1)]
    stopped = None
    try:
        metrics = RunFolder(output).metrics
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes)
            time.sleep(0.1)
        stopped = next(p for p in psutil.Process(nodes[1].pid).children(recursive=True)
                       if "--local_rank=0" in " ".join(p.cmdline()))
        stopped.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        nodes[0].wait(timeout=120)
        err = logs[0].read_text()
        assert nodes[0].returncode != 0 and time.monotonic() - started < 10 + 15, err[-3000:]
        assert "Timed out" in err
    finally:
        if stopped is not None:
            stopped.kill()
        for node in nodes:  # each node's launcher tree is its own session (cogvx train makes the launcher's)
            for process in [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)] \
                    if node.poll() is None else []:
                process.kill()
            node.wait()
