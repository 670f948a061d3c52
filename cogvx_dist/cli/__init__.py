"""The `cogvx` command line: one console script, one command table, one module per command group.

Each module in this package is named after its command (`cogvx prep` -> `cli/prep.py`) and offers
`configure(parser, name)`, which adds the arguments and sets the handler. Handlers import heavy modules (torch,
diffusers, deepspeed) themselves, so `cogvx --help` and config errors come back fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.process import exit_finished

DEBUG_ENV = "COGVX_DEBUG"


@dataclass(frozen=True)
class Command:
    """One `cogvx` subcommand."""

    name: str
    """What the user types."""
    module: str
    """The module of this package that configures and runs it."""
    help: str
    """One line for `cogvx --help`."""


COMMANDS: tuple[Command, ...] = (
    Command("make-tiny-model", "models", "write a tiny random-weight CogVideoX checkpoint"),
    Command("info", "models", "detect a checkpoint's family and print what the family table says of it"),
    Command("families", "models", "list the supported CogVideoX families"),
    Command("prep", "prep", "encode videos and prompts into WebDataset latent shards (resumable, multi-process)"),
    Command("shards", "shards", "inspect or verify a folder of prep shards"),
    Command("plan", "plan", "predict one rank's peak GPU memory and step time before launching, and search for the "
                            "configuration that fits"),
    Command("train", "train", "train a LoRA adapter on this node's GPUs (or CPU ranks) with DeepSpeed"),
    Command("launch", "launch", "check a multi-node launch and print its commands"),
    Command("demo", "demo", "run the whole pipeline (tiny model, synthetic clips, prep, 2-rank training, sampling, "
                            "report) in a few minutes"),
    Command("sample", "sample", "sample a clip with the diffusers pipeline (optionally with a trained LoRA), or "
                                "validate a run's checkpoints as they appear (--watch)"),
    Command("report", "report", "plots (loss, throughput, memory, lr) and a text summary of a training run"),
    Command("export", "export", "write a run's adapter for another tool: diffusers (default) or comfyui"),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of the table."""
    parser = argparse.ArgumentParser(prog="cogvx", description="Distributed LoRA fine-tuning for CogVideoX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        module = importlib.import_module(f"{__name__}.{command.module}")
        module.configure(sub.add_parser(command.name, help=command.help, description=command.help), command.name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cogvx` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except CogvxError as err:
        return _one_line_error(args.command, str(err), err)
    except OSError as err:  # an output path that cannot be created, a full disk: the user's to fix, not a bug trace
        where = f": {err.filename}" if err.filename else ""
        return _one_line_error(args.command, f"{err.strerror or err}{where}", err)
    except KeyboardInterrupt:
        print(f"cogvx {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_error(command: str, message: str, err: BaseException) -> int:
    print(f"cogvx {command}: error: {message}", file=sys.stderr)
    if debugging():
        traceback.print_exception(err, file=sys.stderr)  # with the cause it was raised from
    return 2


def debugging() -> bool:
    """COGVX_DEBUG=1: print the full traceback (and its cause) after a one-line error."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run() -> NoReturn:
    """The `cogvx` console script and `python -m cogvx_dist`: `main`, then a quick exit (see `exit_finished`)."""
    exit_finished(main())


if __name__ == "__main__":
    run()
