"""`cogvx prep ...` and `cogvx shards ...` subcommands (registered into the main `cogvx` parser)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def register(command: AddCommand) -> None:
    """Add the prep tier's subcommands; `command(name, handler, help)` returns the new subparser."""
