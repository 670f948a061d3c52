"""`cogvx demo`, `cogvx sample` and `cogvx report`: seeing what training produced."""

from __future__ import annotations

import argparse
from collections.abc import Callable

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def register(command: AddCommand) -> None:
    """Add the results subcommands."""
