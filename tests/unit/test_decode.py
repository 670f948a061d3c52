"""Real footage in the decoder: display rotation (phones' portrait video), variable frame rate, too-short clips.

Real files only: clips written with PyAV, rotated and re-muxed with the ffmpeg command line (the rotation tests skip
without `ffmpeg` on PATH), decoded by data_prep.decode and prepped through the tiny checkpoint's VAE.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx_dist.core import shard_format
from cogvx_dist.core.synthetic_videos import write_mp4
from data_prep.decode import BadInput, decode_video, frame_indices, nearest_frames

BUCKETS = [(32, 48), (48, 32)]
"""Landscape and portrait, as (height, width)."""

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
    reason="ffmpeg/ffprobe not on PATH (Debian: apt-get install -y ffmpeg): this test makes its clips with them")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=60,
                   capture_output=True)


def _landscape_clip(path: Path, frames: int = 10) -> np.ndarray:
    """An 8 fps 32x64 clip whose picture has no symmetry: a white block in the top-left corner, a green bar in the
    right half, a blue level that changes each frame. Returns the frames written."""
    clip = np.zeros((frames, 32, 64, 3), np.uint8)
    clip[:, :8, :16] = 255
    clip[:, :, 40:48, 1] = 200
    for i in range(frames):
        clip[i, 16:, :, 2] = 20 * i + 10
    write_mp4(path, clip, fps=8)
    return clip


def _ffprobe_rotation(path: Path) -> int:
    """The display matrix's counterclockwise degrees as ffprobe (not PyAV) reads them; 0 without one."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream_side_data=rotation", "-of", "csv=p=0", str(path)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    numbers = re.findall(r"-?\d+", out)
    return int(numbers[0]) if numbers else 0


def _tag_rotation(source: Path, out: Path, degrees: int) -> None:
    """Copy `source` (no re-encode) with a display rotation: -display_rotation where this ffmpeg has it (6.0 on,
    counterclockwise), else the "rotate" stream tag that older ffmpeg turns into a display matrix."""
    try:
        _ffmpeg("-display_rotation:v:0", str(degrees), "-i", str(source), "-c", "copy", str(out))
    except subprocess.CalledProcessError:  # "Unrecognized option" before 6.0
        _ffmpeg("-i", str(source), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", str(out))


TURN_CLOCKWISE = {90: "transpose=clock", 180: "hflip,vflip", 270: "transpose=cclock"}
"""ffmpeg filters that turn a picture clockwise by the key's degrees."""


def _turned(source: Path, out: Path, clockwise: int) -> None:
    """`source` turned by ffmpeg's filters and stored without rotation metadata, losslessly (x264 at qp 0 keeps the
    yuv420p planes exactly, so its frames are the turned decoded frames of `source`)."""
    _ffmpeg("-i", str(source), "-vf", TURN_CLOCKWISE[clockwise], "-c:v", "libx264", "-qp", "0", "-preset",
            "ultrafast", "-pix_fmt", "yuv420p", "-metadata:s:v:0", "rotate=0", str(out))


@needs_ffmpeg
@pytest.mark.parametrize("tag", [90, 180, 270])
def test_rotation_tag_decodes_like_the_turned_clip(tmp_path, tag):
    """A clip with a rotation tag decodes to exactly the frames of the same clip turned by ffmpeg and stored without
    one: turned before the resize, bucketed by the upright shape, the turn recorded."""
    _landscape_clip(tmp_path / "in.mp4")
    _tag_rotation(tmp_path / "in.mp4", tmp_path / "tagged.mp4", tag)
    clockwise = -_ffprobe_rotation(tmp_path / "tagged.mp4") % 360  # what a player does, by ffprobe's reading
    assert clockwise in (90, 180, 270), f"ffmpeg wrote no display rotation for {tag}"
    _turned(tmp_path / "in.mp4", tmp_path / "turned.mp4", clockwise)
    assert _ffprobe_rotation(tmp_path / "turned.mp4") == 0
    # ffmpeg's own autorotation (re-encoding the tagged clip) gives the same upright frames as the explicit turn.
    _ffmpeg("-i", str(tmp_path / "tagged.mp4"), "-c:v", "libx264", "-qp", "0", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", str(tmp_path / "autorotated.mp4"))

    tagged = decode_video(tmp_path / "tagged.mp4", 9, BUCKETS, target_fps=8)
    turned = decode_video(tmp_path / "turned.mp4", 9, BUCKETS, target_fps=8)
    autorotated = decode_video(tmp_path / "autorotated.mp4", 9, BUCKETS, target_fps=8)
    portrait = clockwise in (90, 270)
    assert tagged.frames.shape == (9, *((48, 32) if portrait else (32, 48)), 3)
    assert tagged.source_size == ((64, 32) if portrait else (32, 64)) == turned.source_size
    assert (tagged.rotation, turned.rotation, autorotated.rotation) == (clockwise, 0, 0)
    np.testing.assert_array_equal(tagged.frames, turned.frames)
    np.testing.assert_array_equal(tagged.frames, autorotated.frames)
    assert (tagged.fps, tagged.source_fps, tagged.stride) == (turned.fps, turned.source_fps, turned.stride)
    # The source's top-left white block is where a clockwise turn puts it (a corner of the upright frame).
    height, width = tagged.frames.shape[1:3]
    corner = {90: (0, width - 1), 180: (height - 1, width - 1), 270: (height - 1, 0)}[clockwise]
    assert tagged.frames[0][corner].min() > 200
    assert sum(tagged.frames[0][y, x].min() > 200 for y in (0, height - 1) for x in (0, width - 1)) == 1


@needs_ffmpeg
def test_rotated_clip_preps_to_the_turned_clips_latents(tiny_checkpoint, tmp_path):
    """Through the real VAE: the tagged clip's stored latents are those of the clip turned by ffmpeg; its JSON says
    rotation_degrees, the turned clip's (rotation 0) has no such field."""
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep

    _landscape_clip(tmp_path / "in.mp4")
    _tag_rotation(tmp_path / "in.mp4", tmp_path / "tagged.mp4", 90)
    clockwise = -_ffprobe_rotation(tmp_path / "tagged.mp4") % 360
    _turned(tmp_path / "in.mp4", tmp_path / "turned.mp4", clockwise)
    with open(tmp_path / "m.jsonl", "w") as handle:
        for name in ("tagged.mp4", "turned.mp4"):
            handle.write(json.dumps({"video": name, "prompt": "a white block in a corner"}) + "\n")
    out = tmp_path / "out"
    config = PrepConfig(model=str(tiny_checkpoint("CogVideoX-2b")), data=str(tmp_path / "m.jsonl"), out=str(out),
                        storage_dtype="float32", progress=False, decode_workers=1, buckets=[*BUCKETS],
                        vae_batch_size=1)
    result = run_prep(config)
    assert (result.encoded, result.failed) == (2, 0)
    import webdataset as wds

    samples = {}
    for entry in shard_format.Manifest.read(out).shards:
        for sample in wds.WebDataset(str(out / entry.name), shardshuffle=False, empty_check=False):
            samples[sample["__key__"]] = shard_format.decode_sample(sample)
    tagged, turned = (samples[shard_format.sample_key(name)] for name in ("tagged.mp4", "turned.mp4"))
    assert tagged[0][shard_format.LATENT_MEAN].shape == (16, 3, 6, 4)  # portrait latents
    for name in (shard_format.LATENT_MEAN, shard_format.LATENT_LOGVAR):
        # The same pixels through the same VAE, one clip per batch (vae_batch_size 1): the same bits.
        assert torch.equal(tagged[0][name], turned[0][name]), name
    assert tagged[1]["rotation_degrees"] == clockwise and "rotation_degrees" not in turned[1]
    assert (tagged[1]["height"], tagged[1]["width"], tagged[1]["source_size"]) == (48, 32, [64, 32])


# ------------------------------------------------------------------------------------------------ frame timing
def _numbered_frames(count: int) -> np.ndarray:
    """Grey frames whose left and right halves' levels (6 apart, 40 steps each) say which source frame a decoded one
    is (grey survives yuv420p and x264 within a level or two; colours do not)."""
    frames = np.zeros((count, 32, 48, 3), np.uint8)
    for i in range(count):
        frames[i, :, :24], frames[i, :, 24:] = 8 + 6 * (i % 40), 8 + 6 * (i // 40)
    return frames


def _frame_numbers(frames: np.ndarray) -> list[int]:
    low, high = frames[:, :, :16].reshape(len(frames), -1).mean(1), frames[:, :, 32:].reshape(len(frames), -1).mean(1)
    return [int(round((a - 8) / 6)) + 40 * int(round((b - 8) / 6)) for a, b in zip(low, high)]


def _write_vfr(path: Path, times_ms: list[int]) -> None:
    """An mp4 whose frame i is shown from times_ms[i] (time base 1/1000; the pts are set here, not by a rate)."""
    import av

    frames = _numbered_frames(len(times_ms))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"crf": "10", "preset": "ultrafast"}
        for array, ms in zip(frames, times_ms):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _decoded_times(path: Path) -> list[Fraction]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.pts * stream.time_base for frame in container.decode(stream)]


VFR_MS = [round(k * 1000 / 60) for k in range(30)] + [500 + round(k * 1000 / 15) for k in range(1, 24)]
"""Half a second at 60 fps, then 1.5 s at 15 fps (a phone slowing down in the dark): 53 frames in 2 s."""


def test_variable_frame_rate_is_sampled_by_time(tmp_path):
    path = tmp_path / "vfr.mp4"
    _write_vfr(path, VFR_MS)
    times = _decoded_times(path)
    assert times == [Fraction(ms, 1000) for ms in VFR_MS], "the clip keeps the uneven times written"
    clip = decode_video(path, 9, [(32, 48)], target_fps=8)
    chosen = _frame_numbers(clip.frames)
    assert chosen == nearest_frames(times, 9, 8.0)
    for i, number in enumerate(chosen):
        assert abs(times[number] - times[0] - Fraction(i, 8)) <= Fraction(1, 16), (i, number, times[number])
    span = times[chosen[-1]] - times[chosen[0]]
    assert clip.fps == 8 / float(span) and 7.5 < clip.fps < 8.5  # the rate the frames have, not the one asked
    assert clip.source_fps == pytest.approx(len(VFR_MS) / 2.0, rel=0.05)
    # What the index rule took: its 9th frame is at 0.43 s, labelled 1.0 s at 8 fps.
    by_index = frame_indices(9, clip.source_fps, 8.0, None)[0]
    assert float(times[by_index[-1]]) < 0.5
    # A stride stays by index, whatever the timestamps.
    strided = decode_video(path, 9, [(32, 48)], stride=3)
    assert _frame_numbers(strided.frames) == list(range(0, 25, 3))


def test_nearest_frames_rule():
    """Nearest in time, ties to the earlier frame; a gap longer than a target period shows a frame twice; the end
    takes the last frame only for a target nearer to it than to the end of its showing."""
    times = [Fraction(ms, 1000) for ms in (0, 100, 150, 250, 600, 700)]
    # Targets 0, .125 (a tie: .1), .25, .375 (.25 shown again), .5 (.6), .625 (.6 again), .75, .875.
    assert nearest_frames(times, 7, 8.0) == [0, 1, 3, 3, 4, 4]  # .75 is after the last frame, which may end first
    assert nearest_frames(times, 7, 8.0, end=Fraction(800, 1000)) == [0, 1, 3, 3, 4, 4, 5]  # a tie with the end
    assert nearest_frames(times, 8, 8.0, end=Fraction(800, 1000)) == [0, 1, 3, 3, 4, 4, 5]  # .875 is nearer .8
    assert nearest_frames(times, 8, 8.0, end=Fraction(1050, 1000)) == [0, 1, 3, 3, 4, 4, 5, 5]


@pytest.mark.parametrize("fps", [24, 25, 30, 60])
def test_constant_frame_rate_keeps_the_index_choice(tmp_path, fps):
    """Evenly timed clips are still sampled by int(round(i * step)), banker's rounding and all (at 30 and 60 fps the
    nearest-in-time rule would break ties the other way: frame 7 for 8 at 30 fps, target 2)."""
    count = fps * 2 + 1
    path = write_mp4(tmp_path / f"cfr{fps}.mp4", _numbered_frames(count), fps=fps)
    for frames in (9, 17):
        clip = decode_video(path, frames, [(32, 48)], target_fps=8)
        wanted, step = frame_indices(frames, float(fps), 8.0, None)
        assert _frame_numbers(clip.frames) == wanted
        assert (clip.fps, clip.stride, clip.rotation) == (fps / step, step, 0)
    if fps == 30:
        times = [Fraction(k, 30) for k in range(count)]
        assert nearest_frames(times, 9, 8.0)[2] == 7 != frame_indices(9, 30.0, 8.0, None)[0][2] == 8


@needs_ffmpeg
def test_rounded_timestamps_count_as_even(tmp_path):
    """30 fps in Matroska's 1 ms ticks (gaps of 33 and 34 ms) is a constant rate: the index choice stays."""
    mp4 = write_mp4(tmp_path / "cfr.mp4", _numbered_frames(61), fps=30)
    _ffmpeg("-i", str(mp4), "-c", "copy", str(tmp_path / "cfr.mkv"))
    times = _decoded_times(tmp_path / "cfr.mkv")
    gaps = {b - a for a, b in zip(times, times[1:])}
    assert gaps == {Fraction(33, 1000), Fraction(34, 1000)}
    clip = decode_video(tmp_path / "cfr.mkv", 17, [(32, 48)], target_fps=8)
    assert _frame_numbers(clip.frames) == frame_indices(17, 30.0, 8.0, None)[0] and clip.fps == 8.0


# ------------------------------------------------------------------------------------------------------ too short
def test_too_short_says_how_long_and_what_to_change(tmp_path):
    path = write_mp4(tmp_path / "ramp.mp4", _numbered_frames(20), fps=8)
    with pytest.raises(BadInput) as caught:
        decode_video(path, 11, [(32, 48)], stride=2)
    message = str(caught.value)
    assert message == ("too short: 20 decodable frames, need 21: the clip lasts 2.50 s at 8 fps, 11 frames at 4 fps "
                       "(stride 2) need 2.62 s; use a higher --fps (at least 4.22), a --frame-stride of at most 1, "
                       "or a shorter frame bucket (--frames)")
    # The remedies it names work.
    assert len(decode_video(path, 11, [(32, 48)], target_fps=4.22).frames) == 11
    assert len(decode_video(path, 11, [(32, 48)], stride=1).frames) == 11
    with pytest.raises(BadInput, match=r"^too short: 20 decodable frames, need 25: the clip lasts 2\.50 s at 8 fps, "
                                       r"25 frames at 8 fps need 3\.12 s; the clip has fewer frames than 25 at any "
                                       r"rate: use a shorter frame bucket \(--frames\)$"):
        decode_video(path, 25, [(32, 48)], target_fps=8)
    vfr = tmp_path / "vfr.mp4"
    _write_vfr(vfr, VFR_MS)
    with pytest.raises(BadInput) as caught:
        decode_video(vfr, 25, [(32, 48)], target_fps=8)  # 3 s needed, 2.07 s there
    message = str(caught.value)
    found = re.fullmatch(r"too short: 53 decodable frames with uneven timestamps: the clip lasts 2\.07 s, 25 frames "
                         r"at 8 fps need 3\.02 s; use a higher --fps \(at least ([\d.]+)\), a --frame-stride of at "
                         r"most 2, or a shorter frame bucket \(--frames\)", message)
    assert found, message
    fps = float(found.group(1))
    assert len(decode_video(vfr, 25, [(32, 48)], target_fps=fps).frames) == 25
    with pytest.raises(BadInput, match="too short"):
        decode_video(vfr, 25, [(32, 48)], target_fps=fps - 0.02)
    assert len(decode_video(vfr, 25, [(32, 48)], stride=2).frames) == 25


# --------------------------------------------------------------------------------------- frame buckets and windows
def test_a_clip_goes_to_the_longest_frame_bucket_it_fills(tmp_path):
    from data_prep.decode import decode_windows

    long, medium, short = (write_mp4(tmp_path / f"{n}.mp4", _numbered_frames(n), fps=8) for n in (20, 12, 6))
    assert _frame_numbers(decode_video(long, [9, 17], [(32, 48)], target_fps=8).frames) == list(range(17))
    clip = decode_video(medium, [17, 9], [(32, 48)], target_fps=8)
    assert _frame_numbers(clip.frames) == list(range(9)) and clip.seconds == 9 / 8
    # With a stride: 17 frames two apart need 33 source frames, 9 need 17; the 20-frame clip fills only 9.
    assert _frame_numbers(decode_video(long, [17, 9], [(32, 48)], stride=2).frames) == list(range(0, 17, 2))
    assert decode_windows(medium, [17, 9], [(32, 48)], target_fps=8, windows=3)[0] == 1  # one 9-frame clip fits
    with pytest.raises(BadInput) as caught:
        decode_video(short, [17, 9], [(32, 48)], target_fps=8)
    assert str(caught.value) == (
        "too short: 6 decodable frames, need 9: the clip lasts 0.75 s at 8 fps, 9 frames at 8 fps (the shortest frame "
        "bucket) need 1.12 s; the clip has fewer frames than 9 at any rate: use a shorter frame bucket (--frames)")
    # By time (uneven timestamps): the frames of a shorter bucket are the first ones the longer would take.
    vfr = tmp_path / "vfr.mp4"
    _write_vfr(vfr, VFR_MS)  # 2.07 s: 25 frames at 8 fps need 3.02 s, 17 need 2.02 s
    both = decode_video(vfr, [25, 17], [(32, 48)], target_fps=8)
    assert _frame_numbers(both.frames) == _frame_numbers(decode_video(vfr, 17, [(32, 48)], target_fps=8).frames)
    assert len(both.frames) == 17
    with pytest.raises(BadInput, match=r"33 frames at 8 fps \(the shortest frame bucket\) need 4\.02 s; use a higher "
                                       r"--fps \(at least [\d.]+\), a --frame-stride of at most 1, or a shorter frame "
                                       r"bucket \(--frames\)$"):
        decode_video(vfr, [41, 33], [(32, 48)], target_fps=8)


def test_several_clips_of_a_long_video_are_evenly_spread_apart_and_the_same_each_time(tmp_path):
    from data_prep.decode import decode_windows

    path = write_mp4(tmp_path / "long.mp4", _numbered_frames(100), fps=8)
    count, clips = decode_windows(path, 9, [(32, 48)], target_fps=8, windows=4)
    numbers = [_frame_numbers(clip.frames) for clip in clips]
    starts = [n[0] for n in numbers]
    assert count == 4 and [c.window for c in clips] == [0, 1, 2, 3] and {c.windows for c in clips} == {4}
    assert starts[0] == 0 and numbers[-1][-1] == 99, "from the first frame to the last"
    assert all(n == list(range(n[0], n[0] + 9)) for n in numbers)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert max(gaps) - min(gaps) <= 1 and min(gaps) >= 9, gaps  # evenly spread, never overlapping
    assert [c.start for c in clips] == [s / 8 for s in starts]
    assert np.array_equal(clips[0].frames, decode_video(path, 9, [(32, 48)], target_fps=8).frames)
    again = decode_windows(path, 9, [(32, 48)], target_fps=8, windows=4, skip={1, 3})
    assert again[0] == 4 and [c.window for c in again[1]] == [0, 2]
    assert all(np.array_equal(a.frames, clips[w].frames) for a, w in zip(again[1], (0, 2)))
    # As many as fit: 100 frames hold 11 clips of 9; a stride of 4 makes a clip 33 frames long: 3 fit.
    assert decode_windows(path, 9, [(32, 48)], target_fps=8, windows=50)[0] == 11
    count, strided = decode_windows(path, 9, [(32, 48)], stride=4, windows=5)
    assert count == 3 and [_frame_numbers(c.frames)[:2] for c in strided] == [[0, 4], [34, 38], [67, 71]]
    # Frame buckets: the longest bucket the video fills once, then as many clips of it as fit.
    count, mixed = decode_windows(path, [65, 9], [(32, 48)], target_fps=8, windows=3)
    assert count == 1 and len(mixed[0].frames) == 65


def test_clips_of_a_variable_frame_rate_video_lie_on_their_own_target_grid(tmp_path):
    from data_prep.decode import decode_windows

    # 2 s at 60 fps, 3 s at 15 fps, 2 s at 30 fps: 7 s of uneven timestamps.
    times_ms = ([round(k * 1000 / 60) for k in range(120)] + [2000 + round(k * 1000 / 15) for k in range(45)]
                + [5000 + round(k * 1000 / 30) for k in range(60)])
    path = tmp_path / "vfr.mp4"
    _write_vfr(path, times_ms)
    times = _decoded_times(path)
    count, clips = decode_windows(path, 9, [(32, 48)], target_fps=4, windows=3)
    assert count == 3
    chosen = [_frame_numbers(clip.frames) for clip in clips]
    for clip, numbers in zip(clips, chosen):
        first = times[numbers[0]]
        assert clip.start == pytest.approx(float(first - times[0]))
        for i, number in enumerate(numbers):  # within half a target period of the clip's grid
            assert abs(times[number] - first - Fraction(i, 4)) <= Fraction(1, 8), (clip.window, i, number)
        assert 3.5 < clip.fps < 4.5
    assert chosen[0] == _frame_numbers(decode_video(path, 9, [(32, 48)], target_fps=4).frames)
    assert chosen[0][-1] < chosen[1][0] and chosen[1][-1] < chosen[2][0], "no frame in two clips"
    assert float(times[chosen[2][-1]]) > 6.5, "the last clip ends near the video's end"
