"""Launching: hostfiles, where ranks go, and the command each node runs (see launchers/ and docs/CLUSTER.md).

`check_launch` is the dry run behind `cogvx launch check`: it reads the hostfile (or a node count), the run config
and the shard manifest, checks what would otherwise fail only once every node has started (world size, batch
arithmetic, samples per global batch, paths, the `.deepspeed_env` format), and builds the exact command each node
would run. It starts nothing.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError

LAUNCHERS = ("pdsh", "no-ssh", "mpi", "slurm", "torchrun")
DEFAULT_PORT = 29500
# DeepSpeed's own hostfile rule (`^(\S+)\s+slots=(\d+)`), tightened: only a comment may follow the slots.
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")
_ENV_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Host:
    """One hostfile line."""

    name: str
    """Host name (resolvable on every node)."""
    slots: int
    """Ranks (GPUs) on this host."""


def parse_hostfile(text: str, where: str = "hostfile") -> list[Host]:
    """Hosts of a DeepSpeed/Open MPI hostfile (`host slots=N`, `#` comments, blank lines), in order.

    Raises CogvxError naming the line for anything DeepSpeed would reject (or silently misread)."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.match(line)
        if not match:
            raise CogvxError(f"{where} line {number}: expected \"HOSTNAME slots=N\", got {line!r}")
        name, slots = match.group(1), int(match.group(2))
        if slots < 1:
            raise CogvxError(f"{where} line {number}: {name} has slots={slots}; each host needs at least one slot")
        if name in seen:
            raise CogvxError(f"{where} line {number}: host {name} is already listed on line {seen[name]}")
        seen[name] = number
        hosts.append(Host(name, slots))
    if not hosts:
        raise CogvxError(f"{where}: no hosts (one \"HOSTNAME slots=N\" line per node)")
    return hosts


def read_hostfile(path: str | Path) -> list[Host]:
    """`parse_hostfile` of a file."""
    path = Path(path)
    if not path.is_file():
        raise CogvxError(f"hostfile {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise CogvxError(f"hostfile {path} line {line}: not UTF-8 text (byte {err.object[err.start]:#04x})") from err
    return parse_hostfile(text, where=f"hostfile {path}")


def select_hosts(hosts: list[Host], nodes: int | None, gpus_per_node: int | None) -> list[Host]:
    """The hosts a launch uses: the first `nodes` hosts, each with `gpus_per_node` slots when given (what
    DeepSpeed's --num_nodes/--num_gpus do)."""
    if nodes is not None:
        if nodes < 1:
            raise CogvxError(f"--nodes must be at least 1, got {nodes}")
        if nodes > len(hosts):
            raise CogvxError(f"--nodes {nodes} but the hostfile lists only {len(hosts)} hosts")
        hosts = hosts[:nodes]
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise CogvxError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
        hosts = [Host(h.name, gpus_per_node) for h in hosts]
    return hosts


def place_ranks(hosts: list[Host], world_size: int) -> list[Host]:
    """The hosts `mpiexec -n world_size` uses with this hostfile: it fills each host's slots in order (Open MPI's
    and Hydra's default by-slot mapping), so the last host used may run fewer ranks than its slots."""
    total = sum(h.slots for h in hosts)
    if world_size < 1:
        raise CogvxError(f"--world-size must be at least 1, got {world_size}")
    if world_size > total:
        raise CogvxError(f"--world-size {world_size} but the hosts have only {total} slots "
                         f"({', '.join(f'{h.name}={h.slots}' for h in hosts)}); mpiexec would oversubscribe them")
    placed, left = [], world_size
    for host in hosts:
        if left == 0:
            break
        placed.append(Host(host.name, min(host.slots, left)))
        left -= placed[-1].slots
    return placed


def check_deepspeed_env(path: Path) -> list[str]:
    """Variable names of a `.deepspeed_env` file; raises on lines DeepSpeed mishandles.

    DeepSpeed splits every line at the first "=" and pastes `export KEY=VALUE;` into the remote shell command: a
    blank line crashes the launcher, and a "# comment" line turns the rest of the remote command into a comment,
    so the ranks silently never start."""
    names = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not _ENV_LINE.match(line):
            raise CogvxError(f"{path} line {number}: {line!r} is not NAME=VALUE (DeepSpeed allows no comments or "
                             "blank lines here)")
        names.append(line.split("=", 1)[0])
    return names


@dataclass
class LaunchCheck:
    """What `cogvx launch check` found: the world, the batch, and the commands."""

    hosts: list[Host]
    world_size: int
    global_batch: int
    samples: int
    notes: list[str] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)
    """(where, command line) pairs, in start order."""


def _quote(parts: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in parts)


def _train_args(config: str, overrides: list[str]) -> list[str]:
    return ["--config", config, *overrides]


def build_commands(launcher: str, hosts: list[Host], hostfile: str | None, config: str, overrides: list[str],
                   master_addr: str, master_port: int, limits: dict[str, int | None]) -> list[tuple[str, str]]:
    """The command line(s) that start training with `launcher`, as (where, command) pairs."""
    nnodes, world = len(hosts), sum(h.slots for h in hosts)
    train = ["--module", "cogvx_dist.train", *_train_args(config, overrides)]
    rendezvous = ["--master_addr", master_addr, "--master_port", str(master_port)]
    if launcher == "pdsh":
        if hostfile is None:
            raise CogvxError("--launcher pdsh needs --hostfile (DeepSpeed reads the nodes from it)")
        extra = []
        if limits.get("nodes") is not None:
            extra += ["--num_nodes", str(limits["nodes"])]
        if limits.get("gpus_per_node") is not None:
            extra += ["--num_gpus", str(limits["gpus_per_node"])]
        return [(f"{hosts[0].name} (starts all {nnodes} nodes over pdsh/ssh)",
                 _quote(["deepspeed", "--hostfile", hostfile, *extra, *rendezvous, *train]))]
    if launcher == "no-ssh":  # what launchers/train_node.sh runs: `deepspeed --no_ssh` under cogvx's supervision
        hostfile = hostfile or "hostfile"
        return [
            (f"node {rank} ({host.name})",
             _quote(["cogvx", "train", *_train_args(config, []), "--nproc", str(host.slots), "--hostfile", hostfile,
                     "--node-rank", str(rank), "--nnodes", str(nnodes), "--master-addr", master_addr,
                     "--master-port", str(master_port), *overrides]))
            for rank, host in enumerate(hosts)
        ]
    if launcher == "mpi":
        place = ["--hostfile", hostfile] if hostfile else []
        return [(f"{hosts[0].name} (mpiexec starts all {world} ranks)",
                 _quote(["env", f"MASTER_ADDR={master_addr}", f"MASTER_PORT={master_port}", "mpiexec", "-n",
                         str(world), *place, "python", "-m", "cogvx_dist.train", *_train_args(config, overrides)]))]
    if launcher == "torchrun":  # what launchers/train_torchrun.sh runs: torchrun's elastic agent on every node
        nodes = limits.get("elastic") or str(nnodes)
        return [(f"every node ({', '.join(h.name for h in hosts)})",
                 _quote(["torchrun", "--nnodes", nodes, "--nproc-per-node", str(hosts[0].slots), "--max-restarts",
                         str(limits.get("max_restarts") or 0), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                         f"{master_addr}:{master_port}", "--rdzv-id", "cogvx", "-m", "cogvx_dist.train",
                         *_train_args(config, overrides)]))]
    if launcher == "slurm":
        gpus = hosts[0].slots
        return [("login node",
                 _quote(["sbatch", f"--nodes={nnodes}", f"--gpus-per-node={gpus}", "launchers/slurm/train.sbatch",
                         config, *overrides]))]
    raise CogvxError(f"unknown launcher {launcher!r} (one of {', '.join(LAUNCHERS)})")


@dataclass
class LaunchRequest:
    """What `cogvx launch check` is asked about."""

    config: str
    """Run config path, as the job will read it."""
    overrides: list[str] = field(default_factory=list)
    """section.key=value overrides passed to the job."""
    hostfile: str | None = None
    """DeepSpeed hostfile; without it, `nodes` (and `gpus_per_node`) describe the cluster."""
    nodes: int | None = None
    """Use the first N hosts (without a hostfile: N nodes)."""
    gpus_per_node: int | None = None
    """Ranks per node (default: the hostfile's slots, else 1)."""
    launcher: str = "pdsh"
    """One of LAUNCHERS."""
    world_size: int | None = None
    """Ranks mpiexec starts (launcher mpi only)."""
    master_addr: str | None = None
    """Rendezvous address (default: the first host)."""
    master_port: int = DEFAULT_PORT
    """Rendezvous port."""
    deepspeed_env: str | None = None
    """The .deepspeed_env to check (default: ./ and ~/ as DeepSpeed does)."""
    elastic: str | None = None
    """MIN:MAX nodes of an elastic job (launcher torchrun): the global batch must be kept at every count."""
    max_restarts: int = 3
    """Worker-group restarts torchrun's agent makes after failures (a lost node costs one)."""


def parse_node_range(text: str) -> tuple[int, int]:
    """torchrun's --nnodes: N or MIN:MAX."""
    low, _, high = text.partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError as err:
        raise CogvxError(f"node range {text!r}: expected N or MIN:MAX (torchrun --nnodes)") from err
    if not 1 <= lo <= hi:
        raise CogvxError(f"node range {text!r}: expected MIN:MAX with 1 <= MIN <= MAX")
    return lo, hi


def cluster_hosts(request: LaunchRequest) -> list[Host]:
    """The hosts and ranks per host the launch uses."""
    if request.hostfile:
        hosts = select_hosts(read_hostfile(request.hostfile), request.nodes, request.gpus_per_node)
    else:
        if request.nodes is None:
            raise CogvxError("give --hostfile, or --nodes (and --gpus-per-node) to describe the cluster")
        count = request.gpus_per_node if request.gpus_per_node is not None else 1
        hosts = select_hosts([Host(f"node-{i}", 1) for i in range(max(request.nodes, 1))], request.nodes, count)
    if request.world_size is not None:
        if request.launcher != "mpi":
            raise CogvxError("--world-size is for --launcher mpi (mpiexec -n N); the other launchers start every "
                             "slot of the hosts (trim them with --nodes / --gpus-per-node)")
        hosts = place_ranks(hosts, request.world_size)
    return hosts


def check_launch(request: LaunchRequest) -> LaunchCheck:
    """Every check of `cogvx launch check`; raises CogvxError at the first problem."""
    # Heavy imports here, so `cogvx --help` stays fast.
    from cogvx_dist.core.config_files import load_config
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.preflight import check_batch_fits, check_elastic_range, preflight

    hosts = cluster_hosts(request)
    world = sum(h.slots for h in hosts)
    config = load_config(RunConfig, request.config, request.overrides)
    if request.elastic:
        check_elastic_range(config, *parse_node_range(request.elastic), hosts[0].slots)
    config = config.at_world(world)
    data_ranks = config.data_parallel_size(world)
    checks = preflight(config)  # includes the DeepSpeed JSON: a broken one fails here, not on every rank
    global_batch = check_batch_fits(config, checks.manifest, world)
    samples = checks.manifest.num_samples
    notes = _data_notes(config, len(checks.manifest.shards), samples, data_ranks, global_batch)
    notes += _sequence_parallel_notes(config.parallel.sequence_parallel, hosts, data_ranks)
    notes += _path_notes(config, request.config)
    if request.launcher == "pdsh":
        notes += _deepspeed_env_notes(request.deepspeed_env)
    master_addr = request.master_addr or hosts[0].name
    commands = build_commands(request.launcher, hosts, request.hostfile, request.config, list(request.overrides),
                              master_addr, request.master_port,
                              {"nodes": request.nodes, "gpus_per_node": request.gpus_per_node,
                               "elastic": request.elastic, "max_restarts": request.max_restarts})
    return LaunchCheck(hosts, world, global_batch, samples, notes, commands)


def _data_notes(config: Any, shards: int, samples: int, world: int, global_batch: int) -> list[str]:
    notes = []
    if config.data.streaming:
        # Streaming ranks draw shards with replacement, so any count works, but a rank per shard or more means ranks
        # read the same shards at the same time.
        notes.append(f"streaming {shards} shards to {world} ranks (drawn with replacement; resume is approximate)")
    epochs = config.train.max_steps * global_batch / samples
    notes.append(f"{config.train.max_steps} steps x {global_batch} samples = {epochs:.2f} passes over the data")
    if config.train.global_batch_size:
        notes.append(f"grad_accum_steps {config.train.grad_accum_steps} here: it follows train.global_batch_size "
                     f"{global_batch} at every world size (a grad_accum_steps in the config is not used)")
    return notes


def _sequence_parallel_notes(parts: int, hosts: list[Host], data_ranks: int) -> list[str]:
    """Where the sequence-parallel groups (consecutive ranks) fall: every all-to-all of a group spanning nodes crosses
    the network, tens of times slower than NVLink."""
    if parts == 1:
        return []
    notes = [f"sequence-parallel groups of {parts} ranks: {data_ranks} data-parallel ranks share the batch"]
    spanning = [host.name for host in hosts if host.slots % parts]
    if spanning:
        notes.append(f"WARNING: parallel.sequence_parallel {parts} does not divide the slots of {', '.join(spanning)}: "
                     "some groups span nodes and their attention all-to-alls cross the network")
    return notes


def _path_notes(config: Any, config_path: str) -> list[str]:
    """Relative paths, and where a restarted job resumes."""
    from cogvx_dist.train import checkpoints

    notes = []
    for key, value in (("model.path", config.model.path), ("data.shards", config.data.shards),
                       ("output_dir", config.output_dir), ("config", config_path)):
        if value and not Path(value).is_absolute() and Path(value).exists():
            notes.append(f"{key} {value} is relative: every node must start in the same directory ({Path.cwd()})")
    output = Path(config.output_dir)  # whether it can be written: the pre-flight's check_output_dir, run before
    fresh = config.checkpoint.resume == "auto" and not output.exists()
    resume, passed_over = (None, []) if fresh else checkpoints.find_resume_point(config.output_dir,
                                                                                   config.checkpoint.resume)
    notes += passed_over
    if resume is not None:
        notes.append(f"resumes from {resume} (checkpoint.resume={config.checkpoint.resume})")
    elif config.checkpoint.resume != "auto":
        notes.append(f"checkpoint.resume={config.checkpoint.resume}: a restarted job will NOT resume by itself")
    return notes


def _deepspeed_env_notes(given: str | None) -> list[str]:
    env_files = [p for p in (Path.cwd() / ".deepspeed_env", Path.home() / ".deepspeed_env") if p.is_file()]
    if given:
        env_files = [Path(given)]
        if not env_files[0].is_file():
            raise CogvxError(f"--deepspeed-env {given} does not exist")
    return [f"{env_file} exports {', '.join(check_deepspeed_env(env_file)) or 'nothing'} to every node"
            for env_file in env_files]


HOSTFILE_FORMATS = ("table", "hosts", "slots", "hydra")


def format_hosts(hosts: list[Host], form: str) -> str:
    """Hosts as `cogvx launch hostfile --format` prints them: table ("host slots" lines, then "total N"), hosts (one
    name a line), slots (the total), hydra (MPICH Hydra's "host:N" lines)."""
    if form == "table":
        lines = [f"{h.name} {h.slots}" for h in hosts] + [f"total {sum(h.slots for h in hosts)}"]
    elif form == "hosts":
        lines = [h.name for h in hosts]
    elif form == "slots":
        lines = [str(sum(h.slots for h in hosts))]
    elif form == "hydra":
        lines = [f"{h.name}:{h.slots}" for h in hosts]
    else:
        raise CogvxError(f"unknown hostfile format {form!r} (one of {', '.join(HOSTFILE_FORMATS)})")
    return "\n".join(lines) + "\n"
