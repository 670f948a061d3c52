"""Shards swapped in a shared dataset folder between a crash and the resume: with the default `data.verify` the
resumed run stops at the first sample read from a moved shard, naming it, instead of training on other data."""

from __future__ import annotations

import shutil
from itertools import combinations
from pathlib import Path

import pytest

from cogvx_dist.core import shard_format
from cogvx_dist.core.faults import FAULT_ENV
from cogvx_dist.train.failures import EXIT_USER_ERROR
from tests.helpers import launch, write_config

pytestmark = pytest.mark.slow


def swap_two_shards_of_one_size(folder: Path) -> tuple[str, str]:
    """Exchange the files of two shards whose sizes are equal, so every size check still passes."""
    shards = [entry.name for entry in shard_format.Manifest.read(folder).shards]
    sizes = {name: (folder / name).stat().st_size for name in shards}
    first, second = next((a, b) for a, b in combinations(shards, 2) if sizes[a] == sizes[b])
    (folder / first).rename(folder / "swap.tmp")
    (folder / second).rename(folder / first)
    (folder / "swap.tmp").rename(folder / second)
    return first, second


def test_swapped_shards_stop_the_resumed_run_naming_a_moved_shard(synthetic_shards, tmp_path):
    model, original = synthetic_shards((3, 3, 2))
    shards = tmp_path / "shards"
    shutil.copytree(original, shards)
    config = write_config(tmp_path / "run.yaml", model, shards, tmp_path / "run", train={"max_steps": 8},
                          log={"progress_bar": False, "tensorboard": False})  # data.verify left at its default
    assert launch(config, env={FAULT_ENV: "train.committed=4"}).returncode != 0

    moved = swap_two_shards_of_one_size(shards)
    resumed = launch(config)
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("cogvx train: ")]
    assert resumed.returncode == EXIT_USER_ERROR, resumed.stderr[-3000:]
    assert lines and any(name in lines[-1] for name in moved), lines
    assert "sha256 differs from the manifest" in lines[-1] and "replaced" in lines[-1], lines[-1]
