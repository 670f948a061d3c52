"""Prep under real faults: a full disk (a real tmpfs), a killed process, special files among the inputs, huge frames
and a shard changed after prep wrote it. Real files, real processes, the tiny checkpoint; nothing under test mocked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cogvx_dist.core import shard_format
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.synthetic_videos import make_synthetic_dataset, write_mp4
from data_prep.config import PrepConfig
from data_prep.job import run_prep
from data_prep.shards import read_errors
from tests.helpers import REPO, assert_one_line_error, clean_env, cli, communicate_all, run_cli


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


# ---------------------------------------------------------------------------------------------------- killed rank
KILLED_BEFORE_RENAME = """
import os, signal, sys

# Prep as `cogvx` runs it, killed (SIGKILL: no clean-up) when it is about to rename the N-th temporary file it wrote
# for TARGET: the point a crash leaves that temporary file behind. Nothing of prep is replaced.
target, count, replace, seen = sys.argv[1], int(sys.argv[2]), os.replace, []


def replace_or_die(src, dst, *args, **kwargs):
    if os.fspath(dst) == target:
        seen.append(os.fspath(src))
        if len(seen) == count:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)


os.replace = replace_or_die
from cogvx_dist.cli import main

sys.exit(main(sys.argv[3:]))
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _without_run_stats(files: dict[str, bytes]) -> dict[str, object]:
    """The folder's files with the run's own timings and counts taken out of the manifest and progress file."""
    comparable: dict[str, object] = dict(files)
    manifest = json.loads(files[shard_format.MANIFEST_NAME])
    del manifest["extra"]["totals_last_run"]
    comparable[shard_format.MANIFEST_NAME] = manifest
    part = json.loads(files["parts/rank-00000.json"])
    del part["stats"]
    comparable["parts/rank-00000.json"] = part
    return comparable


def test_a_rerun_removes_the_progress_temporary_a_killed_rank_left_and_only_its_own(tiny_checkpoint, clips,
                                                                                     tmp_path):
    model = tiny_checkpoint("CogVideoX-2b")
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    progress = killed / "parts/rank-00000.json"
    # The second progress write comes after the first shard is renamed: killed there, the rank leaves that shard
    # unrecorded and its new progress file under the temporary name write_atomic gave it.
    run = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAME, str(progress), "2",
                          *_prep_args(model, clips.data, killed)], cwd=REPO, env=clean_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr
    left = sorted(p.name for p in progress.parent.glob(".rank-00000.json.*.tmp"))
    assert len(left) == 1 and re.fullmatch(r"\.rank-00000\.json\.\w+\.tmp", left[0]), left
    assert [p.name for p in killed.glob("shard-*.tar")] == ["shard-r00000-000000.tar"]
    # Another rank's temporary progress file: that rank may be writing it right now, so a rerun of rank 0 keeps it.
    other = progress.parent / ".rank-00001.json.k2j4h6g8.tmp"
    other.write_text("{}")

    again = run_cli(*_prep_args(model, clips.data, killed), env=clean_env())
    assert again.returncode == 0, again.stderr
    assert "already done 2 of 4" in again.stderr
    assert sorted(p.name for p in progress.parent.iterdir()) == [other.name, "errors-r00000.jsonl", progress.name]
    other.unlink()

    clean = run_cli(*_prep_args(model, clips.data, reference), env=clean_env())
    assert clean.returncode == 0, clean.stderr
    resumed, full = _files(killed), _files(reference)
    assert sorted(resumed) == sorted(full)
    assert _without_run_stats(resumed) == _without_run_stats(full)


# ------------------------------------------------------------------------------------------------ special files
@contextlib.contextmanager
def readers_of(fifos: list[Path]) -> Iterator[list[str]]:
    """The names of the FIFOs someone opened for reading meanwhile. A watcher opens each as a writer without waiting,
    which succeeds only while a reader holds it open (and lets a reader blocked in open() go on to an empty read),
    so a prep that opened one is seen instead of hanging."""
    opened: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for fifo in fifos:
                try:
                    handle = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: no reader
                    continue
                opened.append(fifo.name)
                os.close(handle)
            stop.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield opened
    finally:
        stop.set()
        watcher.join()


@pytest.mark.parametrize("layout", ["folder", "jsonl"])
def test_fifos_among_the_inputs_are_reported_by_reason_and_never_opened(tiny_checkpoint, tmp_path, layout):
    data = make_synthetic_dataset(tmp_path / layout, count=1, frames=10, height=32, width=48, layout=layout)
    root = data.root
    fifos = [root / "pipe.mp4", root / "still.png"]
    if layout == "folder":
        # A FIFO named like a video (captioned), one as another clip's caption, one of any name in a subfolder.
        (root / "pipe.txt").write_text("a pipe")
        shutil.copy(root / data.good[0], root / "piped_caption.mp4")
        (root / "sub").mkdir()
        fifos = [root / "pipe.mp4", root / "piped_caption.txt", root / "sub/stray"]
        expected = {"pipe.mp4": "not a regular file (FIFO)", "sub/stray": "not a regular file (FIFO)",
                    "piped_caption.mp4": "caption file piped_caption.txt is not a regular file (FIFO)"}
    else:
        # Listed where a video and where a single image goes.
        with open(data.data, "a") as handle:
            for fifo in fifos:
                handle.write(json.dumps({"video": fifo.name, "prompt": "a pipe"}) + "\n")
        expected = {fifo.name: "not a regular file (FIFO)" for fifo in fifos}
    for fifo in fifos:
        os.mkfifo(fifo)
    out = tmp_path / "out"
    config = PrepConfig(model=str(tiny_checkpoint("CogVideoX-2b")), data=str(data.data), out=str(out),
                        storage_dtype="float32", progress=False, decode_workers=2, max_failed_fraction=0.9)
    with readers_of(fifos) as opened:
        result = run_prep(config)
    assert opened == [], "prep opened a FIFO (a real one blocks until a writer comes)"
    assert (result.encoded, result.failed) == (len(data.good), len(expected))
    assert {e["source"]: e["reason"] for e in read_errors(out / shard_format.ERRORS_NAME)} == expected


# ------------------------------------------------------------------------------------------------------ huge frames
def _blank_mp4(path: Path, height: int, width: int, frames: int = 10) -> Path:
    """A real H.264 file of black frames: a few KB whatever its frame size (a thin frame encodes in milliseconds)."""
    return write_mp4(path, np.zeros((frames, height, width, 3), np.uint8), fps=8)


def test_frames_over_the_size_limit_are_refused_by_reason_before_decoding(tiny_checkpoint, tmp_path):
    from PIL import Image

    from data_prep.decode import MAX_FRAME_PIXELS, MAX_FRAME_SIDE, BadInput, decode_video

    data = make_synthetic_dataset(tmp_path / "set", count=1, frames=10, height=32, width=48, layout="folder")
    root = data.root
    _blank_mp4(root / "wide.mp4", 16, MAX_FRAME_SIDE + 8)  # 8200x16: one side over
    # 1-bit pictures compress to almost nothing: 6016x6016 is 36.2 Mpixel, over the pixel limit with both sides in.
    Image.new("1", (6016, 6016)).save(root / "huge.png")
    Image.new("1", (16, MAX_FRAME_SIDE + 8)).save(root / "tall.png")  # 16x8200
    Image.new("1", (14000, 14000)).save(root / "bomb.png")  # 196 Mpixel: more than PIL itself opens
    for name in ("wide", "huge", "tall", "bomb"):
        (root / f"{name}.txt").write_text(f"a {name} picture")
    assert (root / "huge.png").stat().st_size < 100_000
    out = tmp_path / "out"
    config = PrepConfig(model=str(tiny_checkpoint("CogVideoX-2b")), data=str(data.data), out=str(out),
                        storage_dtype="float32", progress=False, max_failed_fraction=0.9)
    result = run_prep(config)
    assert (result.encoded, result.failed) == (1, 4)
    reasons = {e["source"]: e["reason"] for e in read_errors(out / shard_format.ERRORS_NAME)}
    limit = f"over prep's limit of {MAX_FRAME_SIDE} pixels a side and {MAX_FRAME_PIXELS:,} pixels a frame"
    # PIL refuses to open the bomb itself (before, its DecompressionBombError ended the whole prep job).
    assert re.fullmatch(r"image too large to open \(Image size \(196000000 pixels\) exceeds limit of \d+ pixels.*\); "
                        rf"prep's limit is {MAX_FRAME_SIDE} pixels a side and {MAX_FRAME_PIXELS:,} pixels a frame; "
                        "scale it down first", reasons.pop("bomb.png"))
    assert reasons == {"wide.mp4": f"frame size 8200x16 (width x height) is {limit}; scale it down first",
                       "huge.png": f"frame size 6016x6016 (width x height) is {limit}; scale it down first",
                       "tall.png": f"frame size 16x8200 (width x height) is {limit}; scale it down first"}
    # 8K (7680x4320) is in. A frame inside the limit whose aspect ratio is so far from the bucket's that covering the
    # bucket would make a frame over the limit (a 16-row strip scaled 30 times for 480x720) is refused too.
    assert 7680 <= MAX_FRAME_SIDE and 7680 * 4320 <= MAX_FRAME_PIXELS
    strip = _blank_mp4(tmp_path / "strip.mp4", 16, 8000)
    with pytest.raises(BadInput, match=r"^frame size 8000x16 \(width x height\) is too far from the aspect ratio of "
                                       r"the 480x720 \(HxW\) bucket: covering it takes 240000x480 pixels, over"):
        decode_video(strip, 9, [(480, 720)], target_fps=8)


# ------------------------------------------------------------------------------------------------- changed shards
@pytest.fixture(scope="module")
def two_ranks(tiny_checkpoint, clips, tmp_path_factory) -> tuple[PrepConfig, Path]:
    """The four clips prepped by ranks 0 and 1 (one shard of two samples each; rank 1 merged the manifest)."""
    out = tmp_path_factory.mktemp("changed") / "out"
    config = PrepConfig(model=str(tiny_checkpoint("CogVideoX-2b")), data=str(clips.data), out=str(out),
                        storage_dtype="float32", progress=False, shard_max_samples=2, world_size=2)
    for rank in (0, 1):
        run_prep(config.replace(rank=rank))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-r00000-000000.tar", "shard-r00001-000000.tar"]
    return config, out


def _append_member(shard: Path, size: int) -> None:
    """Append a member to a finished shard in place, as `tar --append` does."""
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))


def _manifest_sizes(out: Path) -> dict[str, int]:
    return {s.name: s.bytes for s in shard_format.Manifest.read(out).shards}


def test_a_shard_changed_after_prep_is_refused_by_name_never_recorded_stale(two_ranks, tmp_path, capsys):
    config, prepped = two_ranks
    # Rank 0's own shard, one empty member more: the tar's end padding takes it, the size stays, the sha256 changes.
    out = shutil.copytree(prepped, tmp_path / "same-size")
    own = out / "shard-r00000-000000.tar"
    size = own.stat().st_size
    _append_member(own, 0)
    assert own.stat().st_size == size, "the appended member should fit in the tar's padding"
    with pytest.raises(CogvxError) as refused:
        run_prep(config.replace(out=str(out), rank=0))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{own}: {size} bytes, sha256 "), message
    assert f"but rank 0 recorded {size} bytes, sha256 " in message and "changed after prep wrote it" in message

    # Rank 1's shard grows by a member; rank 0 reruns and, finding every rank complete, merges the manifest.
    out = shutil.copytree(prepped, tmp_path / "other-rank")
    other = out / "shard-r00001-000000.tar"
    recorded = other.stat().st_size
    _append_member(other, 30_000)
    grown = other.stat().st_size
    assert grown > recorded
    with pytest.raises(CogvxError, match=rf"^{re.escape(str(out))}: shard-r00001-000000.tar is {grown} bytes, but "
                                         rf"rank 1 recorded {recorded}: it changed after prep wrote it"):
        run_prep(config.replace(out=str(out), rank=0))
    assert _manifest_sizes(out)["shard-r00001-000000.tar"] == recorded  # the manifest of before, never rewritten
    code, _, err = cli(capsys, "prep", "finalize", str(out))
    assert_one_line_error(code, err, "shard-r00001-000000.tar is", f"{grown} bytes", f"rank 1 recorded {recorded}")

    # Rank 0's own shard grows: refused by name, not deleted.
    out = shutil.copytree(prepped, tmp_path / "own-grown")
    own = out / "shard-r00000-000000.tar"
    _append_member(own, 30_000)
    grown = own.stat().st_size
    with pytest.raises(CogvxError, match=rf"^{re.escape(str(own))}: {grown} bytes, sha256 \w+, but rank 0 recorded "):
        run_prep(config.replace(out=str(out), rank=0))
    assert own.stat().st_size == grown


def test_under_mpi_a_rank_refusing_its_changed_shard_ends_the_job(tiny_checkpoint, clips, two_ranks, tmp_path):
    """The other rank finishes and waits at the final barrier: the refusing rank must end the MPI job, not leave."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to the interpreter (pip install mpich)")
    out = shutil.copytree(two_ranks[1], tmp_path / "out")
    _append_member(out / "shard-r00000-000000.tar", 30_000)
    proc = subprocess.Popen([str(mpiexec), "-n", "2", sys.executable, "-m", "cogvx_dist",
                             *_prep_args(tiny_checkpoint("CogVideoX-2b"), clips.data, out)], cwd=REPO,
                            env=clean_env(MASTER_ADDR="127.0.0.1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = communicate_all([proc], timeout=180)[0]
    except subprocess.TimeoutExpired:
        pytest.fail("the MPI job hung: rank 1 waited at the final barrier for rank 0, which had refused its shard")
    assert proc.returncode != 0, err
    assert re.search(rf"cogvx prep: error: {re.escape(str(out))}/shard-r00000-000000.tar: \d+ bytes, .* changed "
                     r"after prep wrote it.*\(rank 0 of 2: ending the MPI job\)", err), err
