"""Fixtures shared by unit and end-to-end tests: tiny checkpoints (made once per session and family) and shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than the cores. The end-to-end tests' processes spend much of their time waiting
    (DeepSpeed's launcher polls its ranks each second and sleeps one more after the last, processes start one after
    another, retries back off), so on 2 cores a third worker keeps them busy (measured: 3 workers were faster than
    2 or 4)."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker and the processes its tests start share the cores with the other workers:
    torch's default of a thread per core in every process left OpenMP threads spinning on cores another worker
    needs (the convention cogvx's own CPU ranks follow; an exported OMP_NUM_THREADS wins)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        from cogvx_dist.core.devices import cpu_threads_per_rank

        threads = cpu_threads_per_rank(len(os.sched_getaffinity(0)), workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes tests start
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_checkpoint(family, seed=0) -> Path of a tiny diffusers checkpoint (made once per session, shared
    by the xdist workers)."""
    from cogvx_dist.core.tiny import make_tiny_checkpoint
    from tests.helpers import shared_folder

    made: dict[tuple[str, int], Path] = {}

    def make(family: str = "CogVideoX-2b", seed: int = 0) -> Path:
        key = (family, seed)
        if key not in made:
            made[key] = shared_folder(tmp_path_factory, f"tiny-{family}-{seed}",
                                      lambda folder: make_tiny_checkpoint(folder, family, seed=seed))
        return made[key]

    return make


@pytest.fixture(scope="session")
def synthetic_shards(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """Factory: synthetic_shards(sizes, family="CogVideoX-2b") -> (model, folder) of latent shards with synthetic
    moments in the real format (made once per session, shared by the xdist workers)."""
    from cogvx_dist.core.synthetic_shards import write_synthetic_shards
    from tests.helpers import shared_folder

    made: dict[tuple[tuple[int, ...], str], tuple[Path, Path]] = {}

    def make(sizes: tuple[int, ...], family: str = "CogVideoX-2b") -> tuple[Path, Path]:
        key = (tuple(sizes), family)
        if key not in made:
            model = tiny_checkpoint(family)
            name = f"synthetic-{family}-{'-'.join(map(str, sizes))}"
            made[key] = model, shared_folder(tmp_path_factory, name,
                                             lambda folder: write_synthetic_shards(folder, model, list(sizes)))
        return made[key]

    return make


@pytest.fixture(scope="session")
def prepped_2b(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Shards made by the prep tier from real mp4 clips of moving shapes: 8 samples in shards of 3, 3 and 2 (made once
    per session, shared by the xdist workers)."""
    from cogvx_dist.core.shard_format import Manifest
    from cogvx_dist.core.synthetic_videos import make_synthetic_dataset
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep
    from tests.helpers import shared_folder

    model = tiny_checkpoint("CogVideoX-2b")

    def prep(root: Path) -> None:
        dataset = make_synthetic_dataset(root / "videos", count=8, seed=0)
        result = run_prep(PrepConfig(model=str(model), data=str(dataset.data), out=str(root / "shards"),
                                     storage_dtype="float32", shard_max_samples=3, progress=False))
        assert result.encoded == 8 and [s.samples for s in Manifest.read(root / "shards").shards] == [3, 3, 2]

    return model, shared_folder(tmp_path_factory, "prep-2b", prep) / "shards"
