"""`cogvx launch ...`: checks and commands for cluster launches (see launchers/)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def register(command: AddCommand) -> None:
    """Add the launch subcommands."""
