"""`cogvx launch check` (dry run of a cluster job: checks, then each node's command) and `cogvx launch hostfile`
(the one hostfile reader the launcher scripts use)."""

from __future__ import annotations

import argparse
import sys

from cogvx_dist.launch import DEFAULT_PORT, HOSTFILE_FORMATS, LAUNCHERS


def configure(launch: argparse.ArgumentParser, name: str = "launch") -> None:
    """Arguments and handlers of `cogvx launch check|hostfile`."""
    launch.set_defaults(handler=lambda _: _no_action(launch))
    sub = launch.add_subparsers(dest="launch_command", metavar="ACTION")

    check = sub.add_parser(
        "check", help="dry run: check hostfile, run config and shards, print each node's command",
        description="Check a multi-node job before it starts (world size, batch arithmetic, samples, paths, "
                    ".deepspeed_env) and print the exact command each node would run. Starts nothing.")
    check.set_defaults(handler=run_check)
    check.add_argument("--config", required=True, help="run config (YAML or TOML), as the job will read it")
    check.add_argument("--hostfile", help="DeepSpeed hostfile: one \"HOSTNAME slots=N\" line per node")
    check.add_argument("--nodes", type=int, help="use the first N hosts (without --hostfile: N nodes)")
    check.add_argument("--gpus-per-node", type=int, help="ranks per node (default: the hostfile's slots, else 1)")
    check.add_argument("--launcher", choices=LAUNCHERS, default="pdsh",
                       help="how the job starts: pdsh (deepspeed --hostfile over ssh), no-ssh (per-node "
                            "deepspeed --no_ssh), mpi (mpiexec + MPI discovery), slurm (sbatch), torchrun "
                            "(torchrun's elastic agent on every node, c10d rendezvous)")
    check.add_argument("--world-size", type=int,
                       help="ranks the job starts (mpiexec -n N; --launcher mpi only): they fill the hosts' slots "
                            "in order (default: every slot)")
    check.add_argument("--master-addr", help="rendezvous address (default: the first host)")
    check.add_argument("--master-port", type=int, default=DEFAULT_PORT, help="rendezvous port")
    check.add_argument("--elastic", metavar="MIN:MAX",
                       help="an elastic job's node range (torchrun --nnodes MIN:MAX): refused unless the global batch "
                            "is kept at every node count in it")
    check.add_argument("--max-restarts", type=int, default=3, help="torchrun --max-restarts (launcher torchrun)")
    check.add_argument("--deepspeed-env", help="the .deepspeed_env to check (default: ./ and ~/ as DeepSpeed does)")
    check.add_argument("--quiet", action="store_true", help="print one line on success instead of the report")
    check.add_argument("overrides", nargs="*", help="section.key=value overrides, as passed to the job")

    hostfile = sub.add_parser("hostfile", help="parse a hostfile and print hosts, slots and the world size")
    hostfile.set_defaults(handler=run_hostfile)
    hostfile.add_argument("hostfile", help="DeepSpeed hostfile")
    hostfile.add_argument("--nodes", type=int, help="use the first N hosts")
    hostfile.add_argument("--gpus-per-node", type=int, help="ranks per node")
    hostfile.add_argument("--format", choices=HOSTFILE_FORMATS, default="table",
                          help="table: \"host slots\" lines and the total; hosts: the names; slots: the total; "
                               "hydra: MPICH's \"host:N\" lines (the launchers read hostfiles through this)")


def run_check(args: argparse.Namespace) -> int:
    from cogvx_dist.launch import LaunchRequest, check_launch

    check = check_launch(LaunchRequest(
        config=args.config, overrides=list(args.overrides), hostfile=args.hostfile, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, launcher=args.launcher, world_size=args.world_size,
        master_addr=args.master_addr, master_port=args.master_port, deepspeed_env=args.deepspeed_env,
        elastic=args.elastic, max_restarts=args.max_restarts))
    if args.quiet:
        print(f"cogvx launch check: ok ({len(check.hosts)} nodes, {check.world_size} ranks, global batch "
              f"{check.global_batch}, {check.samples} samples)", file=sys.stderr)
        return 0
    print(f"nodes: {len(check.hosts)}  ranks: {check.world_size}  global batch: {check.global_batch}  "
          f"samples: {check.samples}")
    for rank, host in enumerate(check.hosts):
        print(f"  node {rank}: {host.name} slots={host.slots}")
    for note in check.notes:
        print(f"note: {note}")
    print(f"commands ({args.launcher}):")
    for where, command in check.commands:
        print(f"# {where}")
        print(command)
    return 0


def run_hostfile(args: argparse.Namespace) -> int:
    from cogvx_dist.launch import format_hosts, read_hostfile, select_hosts

    hosts = select_hosts(read_hostfile(args.hostfile), args.nodes, args.gpus_per_node)
    sys.stdout.write(format_hosts(hosts, args.format))
    return 0


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2
