"""`cogvx train`: check the run on this node, then start the DeepSpeed launcher for one node's ranks.

The launcher runs in its own process group. A signal to `cogvx train` (SIGTERM, SIGINT, SIGUSR1) is passed to
that whole group, so the ranks checkpoint and stop (see checkpoint.preempt_signals); `cogvx train` returns only
once no process of the group is left, and kills what outlives the grace period. Afterwards it names the rank and
cause that ended the job first (from output_dir/failures/), or says the run was preempted (exit 75).

`cogvx train` names itself to the ranks (COGVX_SUPERVISOR: host, pid, start time): a rank that finds it gone, or
its own launcher gone, commits a checkpoint at the next step boundary and stops (train/supervision.py), so a
SIGKILLed `cogvx train` leaves nothing training unsupervised. The runner it starts also gets SIGTERM from the
kernel when `cogvx train` dies (PR_SET_PDEATHSIG), which over pdsh ends the other nodes' launchers.

With --node-rank it starts one node's ranks of a multi-node job without ssh (`deepspeed --no_ssh`), which is what
launchers/train_node.sh runs on each node (Slurm, Kubernetes); the same supervision then holds on every node.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
KILL_MARGIN_S = 15.0
"""Seconds past checkpoint.preempt_grace_s after a forwarded signal before the group is killed."""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    import torch

    from cogvx_dist.core.config_files import load_config
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.ds_config import optimizer_in_use
    from cogvx_dist.train.preflight import check_batch_fits, preflight
    from cogvx_dist.train.run_lock import check_free

    if args.no_plan_check:
        args.overrides = [*args.overrides, "plan.check=false"]  # the ranks read it too
    config = load_config(RunConfig, args.config, args.overrides)
    nproc = args.nproc or max(1, torch.cuda.device_count())
    world = nproc * (args.nnodes if args.node_rank is not None else 1)
    config.check_world(config.data_parallel_size(world))
    checks = preflight(config)  # fails here, with one line, before any rank starts
    check_batch_fits(config, checks.manifest, world)
    print(f"cogvx train: optimizer {optimizer_in_use(checks.ds_config)}", flush=True)
    if not args.node_rank:  # on other nodes, node 0's rank 0 may hold the lock already: it is this job's
        check_free(config.output_dir)
        _check_memory(config, checks, world)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = core_sharing_warning(nproc, torch.cuda.device_count(), cores, os.environ.get("OMP_NUM_THREADS"))
    if sharing:
        print(sharing, file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", *_node_args(args), "--num_gpus", str(nproc),
               "--master_port", str(args.master_port or (29500 if args.node_rank is not None else _free_port())),
               "--module", "cogvx_dist.train"]
    if args.config:
        command += ["--config", args.config]
    command += list(args.overrides)
    return _launch(command, config.output_dir, config.checkpoint.preempt_grace_s)


def core_sharing_warning(nproc: int, gpus: int, cores: int, omp_threads: str | None) -> str | None:
    """The warning line when this node's CPU ranks outnumber the cores this process may use (its affinity, which
    a container or Slurm narrows), else None. Not refused: it runs, only each step is slower, and a small test run
    may mean it. Each rank then keeps one torch thread (cpu_threads_per_rank) unless OMP_NUM_THREADS says more."""
    if gpus > 0 or nproc <= cores:
        return None
    threads = f"{omp_threads} torch thread{'' if omp_threads == '1' else 's'} (OMP_NUM_THREADS)" if omp_threads \
        else "1 torch thread"
    return (f"cogvx train: WARNING: --nproc {nproc} CPU ranks on {cores} usable core{'s' if cores > 1 else ''}: "
            f"ranks will share cores, each with {threads}; starting anyway")


def _check_memory(config: Any, checks: Any, world: int) -> None:
    """The memory plan against plan.gpu_memory, here; against the GPU's own memory, rank 0 checks it (asking CUDA
    here would leave a CUDA context beside the ranks)."""
    from cogvx_dist.train.memory.runs import PLAN_CHECKED_ENV, check_run_memory, resolve_checkpointing

    config, why = resolve_checkpointing(config, checks.checkpoint, checks.manifest, checks.ds_config, world,
                                        local_rank=None)
    if why and config.plan.gpu_memory:  # else each rank decides against its own GPU
        print(f"cogvx train: {why}", flush=True)
    line = check_run_memory(config, checks.checkpoint, checks.manifest, checks.ds_config, world, local_rank=None)
    if line:
        print(f"cogvx train: {line}", flush=True)
        os.environ[PLAN_CHECKED_ENV] = "1"


def _node_args(args: argparse.Namespace) -> list[str]:
    """The DeepSpeed launcher flags of one node of a multi-node job started without ssh."""
    from cogvx_dist.core.errors import CogvxError

    if args.node_rank is None:
        return []
    if not (args.hostfile and args.nnodes and args.master_addr):
        raise CogvxError("--node-rank needs --hostfile, --nnodes and --master-addr (see launchers/train_node.sh)")
    if not 0 <= args.node_rank < args.nnodes:
        raise CogvxError(f"--node-rank {args.node_rank} is not within --nnodes {args.nnodes}")
    return ["--hostfile", args.hostfile, "--no_ssh", "--node_rank", str(args.node_rank), "--num_nodes",
            str(args.nnodes), "--master_addr", args.master_addr]


def _launch(command: list[str], output_dir: str, grace_s: float) -> int:
    """Run the launcher in its own process group, forward signals to it, wait for all of it, report the outcome."""
    from cogvx_dist.core.launch_env import SUPERVISOR_ENV, this_supervisor
    from cogvx_dist.core.process import die_with_parent
    from cogvx_dist.train import failures

    launch_id = os.environ.get(failures.LAUNCH_ID_ENV) or uuid.uuid4().hex
    started = time.time()
    env = {**os.environ, "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
           failures.LAUNCH_ID_ENV: launch_id, SUPERVISOR_ENV: str(this_supervisor())}
    # From the main thread, which lives as long as this process: the kernel's parent-death signal follows the
    # thread that forked.
    launcher = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent())
    group = launcher.pid
    deadline: list[float] = []

    def forward(signum: int, frame: object) -> None:
        _signal_group(group, signum)
        if not deadline:
            deadline.append(time.monotonic() + grace_s + KILL_MARGIN_S)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        code = launcher.wait()
        while _group_alive(group):  # the launcher can go first (a signal to the group ends it at once)
            if deadline and time.monotonic() > deadline[0]:
                _signal_group(group, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return _outcome(output_dir, launch_id, started, code)


def _outcome(output_dir: str, launch_id: str, started: float, code: int) -> int:
    """The exit code of the job, with one line on how it ended when it did not finish. Records of this launch
    count, and (multi-node: each node's `cogvx train` has its own launch id) any record written since it began."""
    from cogvx_dist.train import failures

    preempted = failures.read_preemption(output_dir, launch_id, since=started)
    if preempted is not None:
        print(f"cogvx train: preempted by {preempted['signal']}: checkpoint of step {preempted['step']} committed; "
              "rerun the same command to resume", file=sys.stderr)
        return failures.EXIT_PREEMPTED
    from cogvx_dist.core.process import signal_in_exit_code

    records = failures.read_failures(output_dir, launch_id, since=started)
    finished = _finished_since(output_dir, started)
    # DeepSpeed's runner exits 0 when its per-node launcher was killed: the ranks' records still tell how it ended.
    if code == 0 and (not records or finished):
        return 0
    if finished and not records:
        from cogvx_dist.core.run_folder import RunFolder

        print(f"cogvx train: the launcher exited with code {code}, but every rank finished first: the run is complete "
              f"({RunFolder(output_dir).summary})", file=sys.stderr)
        return 0
    local_ranks = [beat["rank"] for beat in failures.heartbeats_here(output_dir, since=started)]
    said = failures.verdict(records, signal_in_exit_code(code), local_ranks)
    if said is not None:
        line, exit_code = said
        print(f"cogvx train: {line}", file=sys.stderr)
        return exit_code
    killed = signal_in_exit_code(code)
    how = f" (a rank of this node was killed by {killed})" if killed else ""
    print(f"cogvx train: the launcher exited with code {code}{how} and no rank recorded why (see the output above)",
          file=sys.stderr)
    return code if code > 0 else failures.EXIT_FAILED


def _finished_since(output_dir: str, started: float) -> bool:
    """True when this launch's run wrote its summary: rank 0 writes it last, once every rank holds the same final
    adapter, so the run finished even if its launcher was killed afterwards or ended with a signal."""
    from cogvx_dist.core.run_folder import RunFolder

    summary = RunFolder(output_dir).summary
    try:
        return summary.stat().st_mtime >= started
    except OSError:
        return False


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(group: int) -> bool:
    """True while a live (not zombie) process of the group exists. Zombies count as gone: an orphan's zombie
    lingers where PID 1 does not reap (many containers), yet holds no resources."""
    proc = "/proc"
    if not os.path.isdir(proc):
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == group:  # state, ppid, pgrp follow the command name
            return True
    return False


def configure(train: argparse.ArgumentParser, name: str = "train") -> None:
    """Arguments and handler of `cogvx train`."""
    train.add_argument("--config", help="run config (YAML or TOML)")
    train.add_argument("--nproc", type=int, default=0, help="ranks on this node (default: one per GPU, else 1)")
    train.add_argument("--master-port", type=int, default=0,
                       help="rendezvous port (default: a free one; 29500 with --node-rank)")
    node = train.add_argument_group("one node of a multi-node job without ssh (launchers/train_node.sh)")
    node.add_argument("--node-rank", type=int, help="this node's rank (0 .. NNODES-1)")
    node.add_argument("--nnodes", type=int, help="nodes in the job")
    node.add_argument("--hostfile", help="DeepSpeed hostfile with a line per node (names do not matter here)")
    node.add_argument("--master-addr", help="address of node 0, reachable from every node")
    train.add_argument("--no-plan-check", action="store_true",
                       help="start even if the memory planner predicts that a rank will not fit its GPU "
                            "(same as plan.check=false)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    train.set_defaults(handler=run)
