"""`cogvx shards inspect DIR` (manifest summary) and `cogvx shards verify DIR` (checksums, and every sample decodes
and fits the manifest)."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser, name: str = "shards") -> None:
    """Arguments and handler of `cogvx shards`."""
    parser.add_argument("action", choices=("inspect", "verify"), help="inspect: manifest summary; verify: full check")
    parser.add_argument("folder", help="shard folder (holding manifest.json)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from data_prep.shards import inspect_text, verify

    if args.action == "inspect":
        print(inspect_text(args.folder))
        return 0
    problems, checked = verify(args.folder)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.folder} ({checked} samples checked)", file=sys.stderr)
        return 1
    print(f"ok: {checked} samples, every shard matches its checksum and every sample decodes")
    return 0
