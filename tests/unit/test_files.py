"""Files other processes read: whole after a crash, and readable by other users as the umask allows."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from cogvx_dist.core.files import make_temporary_folder, write_atomic


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        written = write_atomic(tmp_path / "manifest.json", "{}\n")
        folder = make_temporary_folder(tmp_path, ".staging-")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root and runuser")
def test_another_user_reads_a_tiny_checkpoint_and_a_manifest(tmp_path):
    from cogvx_dist.core.tiny import make_tiny_checkpoint

    shared = Path(tempfile.mkdtemp(prefix="cogvx-shared-"))  # a shared volume: traversable by everyone
    try:
        shared.chmod(0o755)
        previous = os.umask(0o022)
        try:
            model = make_tiny_checkpoint(shared / "model", "CogVideoX-2b")
            manifest = write_atomic(shared / "manifest.json", '{"format": "cogvx-latent-shards"}\n')
        finally:
            os.umask(previous)
        for path in (manifest, model / "model_index.json", model / "transformer" / "config.json"):
            read = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(path)], capture_output=True,
                                  text=True)
            assert read.returncode == 0, (path, read.stderr)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
