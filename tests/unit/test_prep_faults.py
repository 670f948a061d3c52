"""Prep under real faults: a full disk (a real tmpfs), a killed process, special files among the inputs, huge frames
and a shard changed after prep wrote it. Real files, real processes, the tiny checkpoint; nothing under test mocked.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cogvx_dist.core.synthetic_videos import make_synthetic_dataset
from tests.helpers import run_cli


def _prep_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["prep", "--model", str(model), "--data", str(data), "--out", str(out), "--storage-dtype", "float32",
            "--no-progress", "--shard-samples", "2", "--decode-workers", "1", *extra]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory):
    """Four good clips in the CogVideo layout: two shards of two samples (about 40 KiB a sample)."""
    root = tmp_path_factory.mktemp("faults") / "set"
    return make_synthetic_dataset(root, count=4, frames=10, height=32, width=48, fps=8, seed=3, layout="cogvideo")


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "2m") -> Iterator[Path]:
    """A real filesystem of `size` mounted at `folder` (needs root or CAP_SYS_ADMIN), unmounted afterwards."""
    folder.mkdir(parents=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or err
        pytest.skip(f"cannot mount a {size} tmpfs to fill (needs root or CAP_SYS_ADMIN): {str(detail).strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # still busy: detach it anyway


# ------------------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_is_one_line_naming_the_shard_and_leaves_no_temporary_file(tiny_checkpoint, clips, tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        # Room for the empty-prompt embedding (29 KiB) and the progress file, not for a shard of two samples.
        ballast = disk / "ballast"
        ballast.write_bytes(bytes(shutil.disk_usage(disk).free - (64 << 10)))
        out = disk / "out"
        run = run_cli(*_prep_args(tiny_checkpoint("CogVideoX-2b"), clips.data, out))
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        assert [line for line in lines if "error" in line] == lines[-1:], run.stderr
        shard = out / "shard-r00000-000000.tar"
        assert re.fullmatch(rf"cogvx prep: error: the disk is full writing {re.escape(str(shard))} "
                            rf"\(\d+\.\d MiB free on {re.escape(str(out))}\)", lines[-1]), lines[-1]
        assert sorted(p.name for p in disk.rglob("*") if p.name.endswith(".tmp")) == []
        # What was written whole stays: a rerun with space resumes from it.
        assert (out / "empty_prompt.safetensors").is_file() and (out / "parts/rank-00000.json").is_file()
