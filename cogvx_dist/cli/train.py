"""`cogvx train`: check the run on this node, then start the DeepSpeed launcher for one node's ranks.

Multi-node jobs call the per-rank entry point directly (`deepspeed --hostfile H --module cogvx_dist.train ...`);
see launchers/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    import torch

    from cogvx_dist.core.config_files import load_config
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.preflight import preflight

    config = load_config(RunConfig, args.config, args.overrides)
    nproc = args.nproc or max(1, torch.cuda.device_count())
    config.check_world(nproc)
    preflight(config)  # fails here, with one line, before any rank starts
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(args.master_port or _free_port()), "--module", "cogvx_dist.train"]
    if args.config:
        command += ["--config", args.config]
    command += list(args.overrides)
    env = {**os.environ, "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1")}
    return subprocess.call(command, env=env)


def configure(train: argparse.ArgumentParser, name: str = "train") -> None:
    """Arguments and handler of `cogvx train`."""
    train.add_argument("--config", help="run config (YAML or TOML)")
    train.add_argument("--nproc", type=int, default=0, help="ranks on this node (default: one per GPU, else 1)")
    train.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    train.set_defaults(handler=run)
