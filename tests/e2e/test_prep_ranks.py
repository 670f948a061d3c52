"""Prep with several real processes: two mpiexec (mpi4py) ranks, two environment ranks, and a run killed part-way.

Each process is a real `python -m cogvx_dist prep` started in its own interpreter on the tiny checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvx_dist.core import shard_format
from cogvx_dist.core.faults import FAULT_ENV
from cogvx_dist.core.storage import Store
from cogvx_dist.core.synthetic_videos import make_synthetic_dataset
from data_prep.config import PrepConfig
from data_prep.job import run_prep
from data_prep.shards import verify
from tests.helpers import REPO, clean_env, run_cli, shard_keys


def _prep_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["prep", "--model", str(model), "--data", str(data), "--out", str(out), "--storage-dtype", "float32",
            "--no-progress", "--shard-samples", "2", "--max-failed-fraction", "0.6", "--decode-workers", "1", *extra]


def _clean_env(**extra: str) -> dict[str, str]:
    return clean_env(MASTER_ADDR="127.0.0.1", **extra)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp") / "set"
    return make_synthetic_dataset(root, count=7, frames=10, height=32, width=48, fps=8, seed=3, layout="cogvideo",
                                  broken=True)


def _check_job(out: Path, dataset) -> shard_format.Manifest:
    manifest = shard_format.Manifest.read(out)
    by_rank: dict[str, set[str]] = {}
    for name, keys in shard_keys(out).items():
        rank = name.split("-")[1]
        by_rank.setdefault(rank, set()).update(keys)
    assert sorted(by_rank) == ["r00000", "r00001"], "both ranks wrote shards"
    assert not by_rank["r00000"] & by_rank["r00001"], "rank slices overlap"
    assert by_rank["r00000"] | by_rank["r00001"] == {shard_format.sample_key(s) for s in dataset.good}
    assert manifest.num_samples == len(dataset.good) and manifest.skipped == len(dataset.bad)
    assert manifest.extra["ranks"] == 2 and manifest.extra["inputs"] == len(dataset.good) + len(dataset.bad)
    errors = (out / shard_format.ERRORS_NAME).read_text().splitlines()
    assert len(errors) == len(dataset.bad)
    assert verify(out)[0] == []
    return manifest


def test_two_environment_ranks_then_finalize(tiny_checkpoint, dataset, tmp_path):
    model, out = tiny_checkpoint("CogVideoX-2b"), tmp_path / "out"
    procs = [
        subprocess.Popen([sys.executable, "-m", "cogvx_dist", *_prep_args(model, dataset.data, out)], cwd=REPO,
                         env=_clean_env(RANK=str(rank), WORLD_SIZE="2"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    assert "[rank 1]" in outputs[1][1], "non-zero ranks label their messages"
    merged = _check_job(out, dataset)
    # The standalone merge gives the same manifest from the part files.
    (out / shard_format.MANIFEST_NAME).unlink()
    run = run_cli("prep", "finalize", str(out))
    assert run.returncode == 0, run.stderr
    assert shard_format.Manifest.read(out) == merged


def test_two_mpi_ranks(tiny_checkpoint, dataset, tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the interpreter (pip install mpich)")
    model, out = tiny_checkpoint("CogVideoX-2b"), tmp_path / "out"
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "cogvx_dist", *_prep_args(model, dataset.data, out)]
    run = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "(mpi)" in run.stderr
    _check_job(out, dataset)


def test_killed_run_resumes_to_the_same_samples(tiny_checkpoint, dataset, tmp_path):
    model = tiny_checkpoint("CogVideoX-2b")
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    # Die hard after 3 samples: one complete shard of 2, one half-written shard under its temporary name.
    run = run_cli(*_prep_args(model, dataset.data, killed), env=_clean_env(**{FAULT_ENV: "prep.written=3"}))
    assert run.returncode == 3, run.stderr
    assert [p.name for p in killed.glob("shard-*.tar")] == ["shard-r00000-000000.tar"]
    assert [p.name for p in killed.glob(".shard-*.tmp")] == [".shard-r00000-000001.tar.tmp"]
    assert not (killed / shard_format.MANIFEST_NAME).exists()
    again = run_cli(*_prep_args(model, dataset.data, killed), env=_clean_env())
    assert again.returncode == 0, again.stderr
    assert "already done 2 of" in again.stderr and f"encoded {len(dataset.good) - 2}," in again.stderr
    assert not list(killed.glob(".shard-*.tmp"))

    config = PrepConfig(model=str(model), data=str(dataset.data), out=str(reference), storage_dtype="float32",
                        progress=False, shard_max_samples=2, max_failed_fraction=0.6)
    run_prep(config)
    resumed, full = shard_format.Manifest.read(killed), shard_format.Manifest.read(reference)
    resumed_keys = [k for keys in shard_keys(killed).values() for k in keys]
    assert len(resumed_keys) == len(set(resumed_keys)) == full.num_samples
    assert set(resumed_keys) == {k for keys in shard_keys(reference).values() for k in keys}
    assert resumed.skipped == full.skipped
    # Same samples, same tensors.
    import webdataset as wds

    def tensors(folder: Path, manifest: shard_format.Manifest) -> dict[str, dict[str, torch.Tensor]]:
        urls = [str(folder / s.name) for s in manifest.shards]
        return {s["__key__"]: shard_format.decode_sample(s)[0] for s in wds.WebDataset(urls, shardshuffle=False)}

    a, b = tensors(killed, resumed), tensors(reference, full)
    for key in a:
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name])


def test_killed_run_with_several_clips_a_video_resumes_clip_by_clip(tiny_checkpoint, tmp_path):
    """Killed after the 3rd of a video's 3 clips was written (its first two in a complete shard): the rerun encodes
    that clip alone of the video, and the dataset equals an uninterrupted run's, sample digest for sample digest."""
    from cogvx_dist.core.synthetic_videos import render_clip, write_mp4

    data = tmp_path / "data"
    for n, (name, frames) in enumerate((("a_long", 30), ("b_long", 30), ("c_short", 12))):
        write_mp4(data / f"{name}.mp4", render_clip("blue", "circle", "up", frames, 32, 48, seed=n), fps=8)
        (data / f"{name}.txt").write_text(f"a blue circle moves up, {name}")
    model, killed, reference = tiny_checkpoint("CogVideoX-2b"), tmp_path / "killed", tmp_path / "reference"
    args = ("--clips-per-video", "3")
    run = run_cli(*_prep_args(model, data, killed, *args), env=_clean_env(**{FAULT_ENV: "prep.written=3"}))
    assert run.returncode == 3, run.stderr
    assert [p.name for p in killed.glob("shard-*.tar")] == ["shard-r00000-000000.tar"]
    again = run_cli(*_prep_args(model, data, killed, *args), env=_clean_env())
    assert again.returncode == 0, again.stderr
    assert "encoded 5, skipped 0, already done 0 of 3" in again.stderr  # a's 3rd clip, b's 3, c's 1
    assert run_cli(*_prep_args(model, data, reference, *args), env=_clean_env()).returncode == 0

    def digests(folder: Path) -> dict[str, str]:
        index = shard_format.Manifest.read(folder).sample_index(Store(folder))
        return {index.key(i): index.digest(i) for i in range(len(index))}

    resumed = digests(killed)
    a, b, c = (shard_format.sample_key(f"{name}.mp4") for name in ("a_long", "b_long", "c_short"))
    assert set(resumed) == {f"{a}-w01", f"{a}-w02", f"{a}-w03", f"{b}-w01", f"{b}-w02", f"{b}-w03", f"{c}-w01"}
    assert resumed == digests(reference)
    assert shard_format.Manifest.read(killed).stats == shard_format.Manifest.read(reference).stats
    assert verify(killed)[0] == []
