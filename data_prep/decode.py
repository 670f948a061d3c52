"""Video decoding with PyAV: display rotation, frame selection by stride or target fps (by presentation time for
variable frame rate clips), frame buckets (the longest clip length a video fills), several clips from one long video
(`decode_windows`), bucket choice, resize + center crop.

Decoding returns uint8 frames [F, H, W, 3]; `to_model_input` moves them to the encoder's device and scales them to
[-1, 1] there (uint8 is 4x less to copy to a GPU than float32).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cogvx_dist.core.errors import first_line


class BadInput(Exception):
    """This input cannot be used; the message is the reason written to errors.jsonl."""


@dataclass
class Clip:
    """A decoded, resized and cropped clip."""

    frames: np.ndarray
    """uint8 [F, H, W, 3]."""
    fps: float
    """Effective frame rate of the selected frames (source_fps / stride; for frames chosen by time, measured from
    their timestamps: (F - 1) / (last time - first time))."""
    source_fps: float
    """Frame rate of the source stream (its average rate)."""
    stride: float
    """Source frames per selected frame (for frames chosen by time, on average)."""
    source_size: tuple[int, int]
    """(height, width) of the source video as displayed: upright, after `rotation`."""
    rotation: int = 0
    """Degrees (0, 90, 180, 270) the source frames were turned clockwise to stand upright, from the stream's display
    matrix: phones store portrait video as landscape frames with one."""
    window: int = 0
    """Which of the video's clips this is (0-based; decode_windows)."""
    windows: int = 1
    """How many clips the video gives (decode_windows; 1 for decode_video)."""
    start: float = 0.0
    """Seconds from the video's first frame to this clip's first frame."""

    @property
    def seconds(self) -> float:
        """How long the clip lasts at its effective rate (0 for a single image)."""
        return self.frames.shape[0] / self.fps if self.fps > 0 else 0.0

    @property
    def crop_fraction(self) -> float:
        """The fraction of each upright source frame cut off to fit the bucket."""
        return crop_fraction(self.source_size, (self.frames.shape[1], self.frames.shape[2]))


MAX_FRAME_SIDE = 8192
"""The longest side, in pixels, of a frame (or single image) prep decodes: 8K UHD (7680x4320) and DCI 8K
(8192x4320) are in; larger cinema formats (12K and up, recorded as RAW) must be scaled down first."""
MAX_FRAME_PIXELS = 8192 * 4352
"""The most pixels a frame (or single image) prep decodes may have: 35,651,584, the largest picture the highest
levels of H.264 (139,264 macroblocks), HEVC, VP9 and AV1 allow, so every video a conforming encoder wrote at any
level is in, 8K included. A decoded frame of that size is 53 MB (yuv420), 107 MB as RGB; several are in flight per
decode worker. Without the bound a 0.75 MB file of two 16000x16000 frames took prep from 490 MiB to 1.7 GiB (3.3
GiB with more frames)."""


def frame_size_problem(height: int, width: int, buckets: list[tuple[int, int]]) -> str | None:
    """Why a source frame (or image) of this size is refused before anything is decoded, or None. Over
    MAX_FRAME_SIDE / MAX_FRAME_PIXELS; or so far from the aspect ratio of its bucket that the frame scaled to cover
    the bucket (as _Pictures does, before the crop) would be over MAX_FRAME_PIXELS: a 16-row strip is scaled 30 times
    for a 480x720 bucket. Both orientations are checked, as the display rotation is known only from a decoded
    frame."""
    size = f"frame size {width}x{height} (width x height)"
    if max(height, width) > MAX_FRAME_SIDE or height * width > MAX_FRAME_PIXELS:
        return (f"{size} is over prep's limit of {MAX_FRAME_SIDE} pixels a side and {MAX_FRAME_PIXELS:,} pixels a "
                "frame; scale it down first")
    for upright in ((height, width), (width, height)):
        bucket = choose_bucket(*upright, buckets)
        covering = resized_size(*upright, bucket)
        if covering[0] * covering[1] > MAX_FRAME_PIXELS:
            return (f"{size} is too far from the aspect ratio of the {bucket[0]}x{bucket[1]} (HxW) bucket: covering "
                    f"it takes {covering[1]}x{covering[0]} pixels, over prep's limit of {MAX_FRAME_PIXELS:,}; crop "
                    "it first or add a bucket of its shape")
    return None


def _refuse_frame_size(height: int, width: int, buckets: list[tuple[int, int]]) -> None:
    """BadInput with the reason when frame_size_problem refuses the size."""
    problem = frame_size_problem(height, width, buckets)
    if problem:
        raise BadInput(problem)


def choose_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height x width (log ratio; ties go to the earlier bucket)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


def resized_size(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Size to scale to so that the bucket is covered, before the center crop (aspect ratio kept)."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    return max(bh, round(height * scale)), max(bw, round(width * scale))


def crop_fraction(source_size: Sequence[int], bucket: Sequence[int]) -> float:
    """The fraction of a frame of `source_size` (height, width) that the center crop to `bucket` cuts off, after the
    frame is scaled to cover the bucket (resized_size): 0 for a frame of the bucket's shape."""
    height, width = int(source_size[0]), int(source_size[1])
    if height <= 0 or width <= 0:
        return 0.0
    covering = resized_size(height, width, (int(bucket[0]), int(bucket[1])))
    return max(0.0, 1.0 - (bucket[0] * bucket[1]) / (covering[0] * covering[1]))


def frame_buckets(frames: int | Sequence[int]) -> list[int]:
    """A frame count or several as frame buckets, longest first."""
    return [int(frames)] if isinstance(frames, (int, np.integer)) else sorted(map(int, frames), reverse=True)


def center_crop(array: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Crop [..., H, W, C] to the bucket around the center."""
    bh, bw = bucket
    h, w = array.shape[-3], array.shape[-2]
    top, left = (h - bh) // 2, (w - bw) // 2
    return array[..., top : top + bh, left : left + bw, :]


def frame_indices(frames: int, source_fps: float, target_fps: float | None,
                  stride: int | None) -> tuple[list[int], float]:
    """Source frame indices to take, and the stride they imply.

    With a target fps the step is source_fps / target_fps (never below 1: a slower source is not padded with
    repeated frames); with a stride it is that stride.
    """
    step = float(stride) if stride is not None else max(1.0, source_fps / target_fps) if target_fps else 1.0
    return [int(round(i * step)) for i in range(frames)], step


class NearestFrames:
    """Frame choice by presentation time, fed one frame time at a time (in order, strictly increasing).

    Target i is at t_0 + i / target_fps (t_0: the first frame's time) and takes the frame whose time is nearest, ties
    going to the earlier frame. Fed frame by frame so that decoding keeps one frame back, not the whole clip. Times
    are exact Fractions (pts x time_base), so a tie is a tie.
    """

    def __init__(self, count: int, target_fps: float) -> None:
        self.count = count
        self.period = 1 / Fraction(target_fps)
        self.chosen: list[int] = []
        """Frame numbers (0-based, in the order offered) chosen for targets 0, 1, ...; a frame may serve twice where
        the source has a gap longer than a target period (the frame on screen then is the one shown twice)."""
        self.times: list[Fraction] = []
        """The chosen frames' times."""
        self.start: Fraction | None = None
        self.previous: Fraction | None = None
        self.frame = -1

    @property
    def done(self) -> bool:
        return len(self.chosen) == self.count

    def target(self, i: int) -> Fraction:
        assert self.start is not None
        return self.start + i * self.period

    def offer(self, time: Fraction) -> None:
        """The next frame's time: resolves every target up to it (the previous frame or this one)."""
        self.frame += 1
        if self.start is None:
            self.start = time
        while not self.done and time >= (target := self.target(len(self.chosen))):
            if self.previous is not None and target - self.previous <= time - target:
                self.chosen.append(self.frame - 1)
                self.times.append(self.previous)
            else:
                self.chosen.append(self.frame)
                self.times.append(time)
        self.previous = time

    def end(self, time: Fraction) -> None:
        """No frame follows the last one offered, which is shown until `time`: a target nearer to the last frame than
        to `time` (as if a frame came then) takes the last frame, like the index rule's rounding does at the end."""
        while (not self.done and self.previous is not None
               and (target := self.target(len(self.chosen))) - self.previous <= time - target):
            self.chosen.append(self.frame)
            self.times.append(self.previous)

    def needed_seconds(self, last_duration: Fraction) -> float:
        """Seconds of video (first frame's start to last frame's end) the targets need when the last frame is shown
        for `last_duration`: the end rule above takes the last target when it is within half that of the last frame."""
        return float((self.count - 1) * self.period + last_duration / 2)


def nearest_frames(times: list[Fraction], count: int, target_fps: float,
                   end: Fraction | None = None) -> list[int]:
    """Indices into `times` (strictly increasing) that NearestFrames chooses; fewer than `count` when too short."""
    chooser = NearestFrames(count, target_fps)
    for time in times:
        if chooser.done:
            break
        chooser.offer(time)
    if end is not None:
        chooser.end(end)
    return chooser.chosen


def display_rotation(frame: Any) -> int:
    """Clockwise degrees (0, 90, 180 or 270) that turn a decoded frame upright, from its display matrix.

    PyAV's frame.rotation is the matrix's counterclockwise angle (0 without one); phones' "rotate=90" (portrait
    shot with the phone upright) is a matrix of -90 there. Angles between multiples of 90 go to the nearest one, and a
    mirroring in the matrix is not applied.
    """
    counterclockwise = getattr(frame, "rotation", 0) or 0
    return round(-counterclockwise / 90) % 4 * 90


_UPRIGHT: dict[int, tuple[tuple[str, str | None], ...]] = {
    90: (("transpose", "clock"),),
    180: (("hflip", None), ("vflip", None)),
    270: (("transpose", "cclock"),),
}
"""libavfilter filters that turn a frame clockwise by the key's degrees: what ffmpeg's own autorotation inserts.
They move pixels in the decoded format (chroma planes too), so a clip with a rotation tag decodes to exactly the
frames of the same clip turned by ffmpeg and stored losslessly."""


class _Pictures:
    """Decoded frames -> uint8 [H, W, 3] of the bucket: turned upright first, then resized and center-cropped."""

    def __init__(self, rotation: int, bucket: tuple[int, int], resized: tuple[int, int]) -> None:
        self.rotation, self.bucket, self.resized = rotation, bucket, resized
        self.graph: Any = None

    def __call__(self, frame: Any) -> np.ndarray:
        if self.rotation:
            frame = self._upright(frame)
        # swscale does resize + RGB conversion in one pass; area averaging avoids aliasing on downscale.
        rgb = frame.reformat(width=self.resized[1], height=self.resized[0], format="rgb24",
                             interpolation="AREA").to_ndarray()
        return center_crop(rgb, self.bucket)

    def _upright(self, frame: Any) -> Any:
        import av

        if self.graph is None:  # built from the first frame: its pixel format is known only once decoded
            self.graph = av.filter.Graph()
            nodes = [self.graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                           time_base=frame.time_base or Fraction(1, 1000))]
            nodes += [self.graph.add(name, args) for name, args in _UPRIGHT[self.rotation]]
            nodes.append(self.graph.add("buffersink"))
            self.graph.link_nodes(*nodes).configure()
        self.graph.vpush(frame)
        return self.graph.vpull()


class _Decoded:
    """A stream's frames in presentation order, counted; a decoder error ends them and is kept in `error`."""

    def __init__(self, container: Any, stream: Any) -> None:
        self.frames = container.decode(stream)
        self.time_base = stream.time_base
        self.seen = 0
        self.error: BaseException | None = None
        self.last: Any = None

    def __iter__(self) -> Iterator[Any]:
        import av

        while True:
            try:
                frame = next(self.frames)
            except StopIteration:
                return
            except (av.FFmpegError, OSError, ValueError) as err:
                self.error = err
                return
            self.seen += 1
            self.last = frame
            yield frame

    def time(self, frame: Any) -> Fraction | None:
        """A frame's presentation time in seconds, exact; None without a pts."""
        base = frame.time_base or self.time_base
        return None if frame.pts is None or base is None else frame.pts * Fraction(base)


class _Gaps:
    """Whether frame timestamps so far are unevenly spaced: two gaps differ by more than one tick (muxers that round
    times to their time base, e.g. 30 fps in 1 ms ticks as 33, 33, 34, stay even). Missing or non-increasing
    timestamps cannot time anything and never count as uneven (the index rule stays)."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.gaps: tuple[int, int] | None = None
        """(smallest, largest) gap so far, in ticks."""
        self.usable = True

    def add(self, pts: int | None) -> None:
        if not self.usable:
            return
        if pts is None or (self.last is not None and pts <= self.last):
            self.usable = False
            return
        if self.last is not None:
            gap = pts - self.last
            self.gaps = (gap, gap) if self.gaps is None else (min(self.gaps[0], gap), max(self.gaps[1], gap))
        self.last = pts

    @property
    def uneven(self) -> bool:
        return self.usable and self.gaps is not None and self.gaps[1] - self.gaps[0] > 1


def decode_video(
    path: str | Path,
    frames: int | Sequence[int],
    buckets: list[tuple[int, int]],
    target_fps: float | None = None,
    stride: int | None = None,
    default_fps: float = 8.0,
) -> Clip:
    """Decode `frames` frames of a video, turned upright, resized and center-cropped to the best bucket. With several
    frame counts (frame buckets), as many as the longest of them the video fills.

    A display rotation (phones' portrait video) is applied first and the bucket is chosen by the upright shape.
    Frames are taken by index (source_fps / target_fps apart, or `stride` apart). With a target fps, a clip whose
    timestamps are uneven (variable frame rate) is decoded again and its frames chosen by presentation time instead
    (NearestFrames): the index rule stays for even clips, where it chooses exactly what it always chose.
    Raises BadInput (missing, empty, unreadable, no video stream, too short) with the reason.
    """
    counts = frame_buckets(frames)
    path = _check_file(path)
    container = _open(path)
    try:
        stream = _video_stream(container)
        source_fps = _stream_rate(stream, default_fps, buckets)
        decoded = _Decoded(container, stream)
        frames_in = iter(decoded)
        first = next(frames_in, None)
        rotation, upright, pictures = _upright_pictures(first, stream, buckets)
        wanted, step = frame_indices(counts[0], source_fps, target_fps, stride)
        # Only a target fps that skips frames asks for timing; a stride is by index whatever the timestamps.
        by_time = target_fps is not None and stride is None and step > 1.0
        array = _by_index(itertools.chain([first] if first is not None else [], frames_in), decoded, wanted, step,
                          source_fps, pictures, path, stop_if_uneven=by_time, counts=counts)
    finally:
        container.close()
    if array is not None:
        return Clip(array, source_fps / step, source_fps, step, upright, rotation)
    assert target_fps is not None
    pictures = _Pictures(rotation, pictures.bucket, pictures.resized)  # a fresh filter graph: times restart
    container = _open(path)
    try:
        stream = _video_stream(container)
        array, chosen, times = _by_time(container, stream, counts, target_fps, pictures, path)
    finally:
        container.close()
    span = float(times[-1] - times[0])
    fps = (len(times) - 1) / span if span > 0 else float(target_fps)
    frame_step = (chosen[-1] - chosen[0]) / (len(chosen) - 1) if len(chosen) > 1 else step
    return Clip(array, fps, source_fps, frame_step, upright, rotation)


def decode_windows(
    path: str | Path,
    frames: int | Sequence[int],
    buckets: list[tuple[int, int]],
    target_fps: float | None = None,
    stride: int | None = None,
    default_fps: float = 8.0,
    windows: int = 1,
    skip: Collection[int] = (),
) -> tuple[int, list[Clip]]:
    """Up to `windows` clips of one video: (how many it gives, the clips but those numbered in `skip`).

    The clips are of the longest frame bucket the video fills once, non-overlapping, the first at the video's start,
    the last as near its end as the last one fits, the others evenly between; the same on every run. With
    `windows` 1 this is decode_video's one clip. The frame count and timestamps come from the container's packets
    (read without decoding), then one decoding pass takes every clip's frames; a clip whose timestamps are uneven
    (variable frame rate, by the whole video's packets) is timed as decode_video times it. A video too short for one
    clip, or whose packets do not say, is decode_video's (one clip, or its reason). Every clip is held until the
    video is decoded: a process holds up to `windows` clips per video in flight.
    """
    if windows == 1:
        return 1, ([] if 0 in skip else [decode_video(path, frames, buckets, target_fps, stride, default_fps)])
    counts = frame_buckets(frames)
    path = _check_file(path)
    container = _open(path)
    try:
        stream = _video_stream(container)
        source_fps = _stream_rate(stream, default_fps, buckets)
        packets = _packet_times(container, stream)
    finally:
        container.close()
    _, step = frame_indices(1, source_fps, target_fps, stride)
    by_time = target_fps is not None and stride is None and step > 1.0 and packets.uneven
    plan = (_plan_by_time(packets, counts, target_fps, windows) if by_time
            else _plan_by_index(packets.count, counts, source_fps, target_fps, stride, windows))
    if plan is None:
        return 1, ([] if 0 in skip else [decode_video(path, frames, buckets, target_fps, stride, default_fps)])
    starts, chosen = plan
    wanted: dict[int, list[tuple[int, int]]] = {}
    for window, numbers in enumerate(chosen):
        if window not in skip:
            for position, number in enumerate(numbers):
                wanted.setdefault(number, []).append((window, position))
    clips: dict[int, list[np.ndarray | None]] = {w: [None] * len(chosen[w]) for w in range(len(chosen))
                                                 if w not in skip}
    if not wanted:
        return len(chosen), []
    rotation, upright, pictures = _take_frames(path, wanted, clips, buckets, by_time, packets.count, len(chosen))
    result = []
    for window, pictured in clips.items():
        numbers = chosen[window]
        if by_time:
            span = float(packets.times[numbers[-1]] - packets.times[numbers[0]])
            fps = (len(numbers) - 1) / span if span > 0 else float(target_fps or 0)
            frame_step = (numbers[-1] - numbers[0]) / (len(numbers) - 1) if len(numbers) > 1 else step
        else:
            fps, frame_step = source_fps / step, step
        result.append(Clip(np.stack(pictured), fps, source_fps, frame_step, upright, rotation, window, len(chosen),
                           round(starts[window], 6)))
    return len(chosen), result


def _take_frames(path: Path, wanted: dict[int, list[tuple[int, int]]], clips: dict[int, list[np.ndarray | None]],
                 buckets: list[tuple[int, int]], by_time: bool, promised: int,
                 windows: int) -> tuple[int, tuple[int, int], Any]:
    """One decoding pass that puts frame `number`'s picture at every (window, position) `wanted` lists for it, into
    `clips`; returns (rotation, upright size, the picture maker). Frames are numbered as _packet_times numbers them:
    with `by_time`, by time, passing over frames that cannot be timed."""
    container = _open(path)
    try:
        stream = _video_stream(container)
        decoded = _Decoded(container, stream)
        frames_in = iter(decoded)
        first = next(frames_in, None)
        rotation, upright, pictures = _upright_pictures(first, stream, buckets)
        last, number, previous = max(wanted), -1, None
        for frame in itertools.chain([first] if first is not None else [], frames_in):
            if by_time:
                time = decoded.time(frame)
                if time is None or (previous is not None and time <= previous):
                    continue
                previous = time
            number += 1
            if number in wanted:
                picture = pictures(frame)
                for window, position in wanted[number]:
                    clips[window][position] = picture
            if number >= last:
                break
    finally:
        container.close()
    if number < last:
        _raise_corrupt(decoded, path)
        raise BadInput(f"decoded {number + 1} frames where its packets promise {promised}: clip "
                       f"{min(w for n, ws in wanted.items() if n > number for w, _ in ws) + 1} of {windows} "
                       "cannot be made")
    return rotation, upright, pictures


@dataclass
class _Packets:
    """What a video's packets say without decoding: how many frames, and their presentation times in order."""

    count: int
    """Packets holding a frame."""
    times: list[Fraction]
    """Their times in seconds, sorted (empty when a packet has no timestamp, or two share one)."""
    end: Fraction | None
    """When the last frame stops showing (its time plus its duration, else plus the last gap)."""
    uneven: bool
    """The timestamps are uneven (as _Gaps judges them)."""


def _packet_times(container: Any, stream: Any) -> _Packets:
    count, ticks, durations = 0, [], {}
    for packet in container.demux(stream):
        if not packet.size:  # the demuxer's flush packet
            continue
        count += 1
        ticks.append(packet.pts)
        durations[packet.pts] = packet.duration
    if None in ticks or len(set(ticks)) != len(ticks) or stream.time_base is None:
        return _Packets(count, [], None, False)
    ticks.sort()
    gaps = _Gaps()
    for tick in ticks:
        gaps.add(tick)
    base = Fraction(stream.time_base)
    times = [tick * base for tick in ticks]
    shown = (durations[ticks[-1]] or 0) * base or (times[-1] - times[-2] if len(times) > 1 else Fraction(0))
    return _Packets(count, times, times[-1] + shown if times else None, gaps.uneven)


def _spread(room: float, windows: int) -> list[float]:
    """Offsets of `windows` clips spread evenly over `room` (the first at 0, the last at `room`)."""
    return [0.0] if windows == 1 else [i * room / (windows - 1) for i in range(windows)]


def _plan_by_index(count: int, counts: list[int], source_fps: float, target_fps: float | None, stride: int | None,
                   windows: int) -> tuple[list[float], list[list[int]]] | None:
    """(start seconds, frame numbers) of each clip for the longest frame bucket that fits once in `count` frames;
    None when none does."""
    for frames in counts:
        wanted, _ = frame_indices(frames, source_fps, target_fps, stride)
        need = wanted[-1] + 1
        fit = min(windows, count // need)
        if fit:
            # Rounding an offset never brings two clips closer than `need`: the spacing is at least `need`, whole.
            starts = [round(offset) for offset in _spread(count - need, fit)]
            return [start / source_fps for start in starts], [[start + i for i in wanted] for start in starts]
    return None


def _plan_by_time(packets: _Packets, counts: list[int], target_fps: float | None,
                  windows: int) -> tuple[list[float], list[list[int]]] | None:
    """(start seconds, frame numbers) of each clip, chosen by time (NearestFrames from each clip's first frame), for
    the longest frame bucket that fits once; as many clips as fit without sharing a frame. None when none fits."""
    assert target_fps is not None and packets.end is not None
    times, period = packets.times, 1 / Fraction(target_fps)
    total = packets.end - times[0]
    for frames in counts:
        span = frames * period  # a clip's frames show for about this long
        for fit in range(min(windows, int(total / span)), 0, -1):
            firsts = [bisect.bisect_left(times, times[0] + Fraction(offset))
                      for offset in _spread(float(total - span), fit)]
            chosen = []
            for i, first in enumerate(firsts):
                numbers = [first + n for n in nearest_frames(times[first:], frames, target_fps, packets.end)]
                limit = firsts[i + 1] if i + 1 < len(firsts) else len(times)
                if len(numbers) < frames or numbers[-1] >= limit:
                    break
                chosen.append(numbers)
            if len(chosen) == fit:
                return [float(times[first] - times[0]) for first in firsts], chosen
    return None


def _check_file(path: str | Path) -> Path:
    """BadInput for a path that cannot be a video file, before anything opens it."""
    path = Path(path)
    if not path.exists():
        raise BadInput("missing file")
    if path.is_dir():
        raise BadInput("is a folder, not a video file")
    if path.stat().st_size == 0:
        raise BadInput("empty file (0 bytes)")
    return path


def _stream_rate(stream: Any, default_fps: float, buckets: list[tuple[int, int]]) -> float:
    """The stream's average frame rate (default_fps without one), after refusing its frame size from its header."""
    height, width = stream.codec_context.height, stream.codec_context.width
    if not height or not width:
        raise BadInput("video stream has no frame size")
    _refuse_frame_size(height, width, buckets)  # from the stream's header: nothing is decoded yet
    return float(stream.average_rate) if stream.average_rate else float(default_fps)


def _upright_pictures(first: Any, stream: Any,
                      buckets: list[tuple[int, int]]) -> tuple[int, tuple[int, int], _Pictures]:
    """(rotation, upright (height, width), frame -> bucket picture), from the first decoded frame's display matrix."""
    height, width = stream.codec_context.height, stream.codec_context.width
    rotation = display_rotation(first) if first is not None else 0
    upright = (width, height) if rotation in (90, 270) else (height, width)
    bucket = choose_bucket(*upright, buckets)
    return rotation, upright, _Pictures(rotation, bucket, resized_size(*upright, bucket))


_DECODER_MAX_PIXELS = {"max_pixels": str(2 * MAX_FRAME_PIXELS)}
"""FFmpeg's own bound on the frames a decoder allocates (its check rounds the width up to the stride alignment, hence
the room above MAX_FRAME_PIXELS). Opening a file decodes its first frame to probe the stream, before prep can read
the size (a 16000x16000 frame: 600 MiB); and a stream whose coded size is larger than its header says fails to
decode instead of growing."""


def _open(path: Path) -> Any:
    import av

    try:
        return av.open(str(path), options=_DECODER_MAX_PIXELS)  # options reach the probing decoders
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as err:
        raise BadInput(f"unreadable video ({_reason(err, path)})") from err


def _video_stream(container: Any) -> Any:
    if not container.streams.video:
        raise BadInput("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.options = dict(_DECODER_MAX_PIXELS)
    return stream


def _by_index(frames: Iterator[Any], decoded: _Decoded, wanted: list[int], step: float, source_fps: float,
              pictures: _Pictures, path: Path, stop_if_uneven: bool, counts: list[int]) -> np.ndarray | None:
    """The wanted frame indices (those of the longest of `counts`) as uint8 [F, H, W, 3], or the first F of them for
    the longest count F the video fills; None (having stopped early) if `stop_if_uneven` and the timestamps up to the
    last wanted frame are uneven."""
    wanted_set, last = set(wanted), wanted[-1]
    picked: dict[int, np.ndarray] = {}
    gaps = _Gaps()
    for index, frame in enumerate(frames):
        gaps.add(frame.pts)
        if stop_if_uneven and gaps.uneven:
            return None
        if index in wanted_set:
            picked[index] = pictures(frame)
        if index >= last:
            break
    if len(picked) < len(wanted):
        _raise_corrupt(decoded, path)
        # Frames come in order, so what was picked is the first len(picked) wanted: the shorter counts' indices.
        fits = [count for count in counts if count <= len(picked)]
        if fits:
            return np.stack([picked[i] for i in wanted[:fits[0]]])
        shortest = wanted[:counts[-1]]
        rate = source_fps / step
        # The frames fit when source_fps / fps <= (seen - 1) / (count - 1): at least this fps.
        min_fps = source_fps * (len(shortest) - 1) / max(1, decoded.seen - 1)
        how = (f"{len(shortest)} frames at {rate:.4g} fps" + (f" (stride {step:g})" if step > 1.0 else "")
               + (" (the shortest frame bucket)" if len(counts) > 1 else ""))
        raise BadInput(f"too short: {decoded.seen} decodable frames, need {shortest[-1] + 1}: the clip lasts "
                       f"{decoded.seen / source_fps:.2f} s at {source_fps:.4g} fps, {how} need "
                       f"{(shortest[-1] + 1) / source_fps:.2f} s; {_remedies(decoded.seen, len(shortest), min_fps)}")
    return np.stack([picked[i] for i in wanted])


def _by_time(container: Any, stream: Any, counts: list[int], target_fps: float, pictures: _Pictures,
             path: Path) -> tuple[np.ndarray, list[int], list[Fraction]]:
    """The longest of `counts` that the clip fills, in frames chosen by presentation time (NearestFrames), as uint8
    [F, H, W, 3], with the chosen frame numbers and times. Frames without a timestamp, or not after the one before,
    are passed over."""
    count = counts[0]
    decoded = _Decoded(container, stream)
    chooser = NearestFrames(count, target_fps)
    previous: tuple[Any, np.ndarray | None] | None = None  # the frame before, and its picture once made
    picked: list[np.ndarray] = []
    times: list[Fraction] = []
    last_gap = Fraction(0)
    for frame in decoded:
        time = decoded.time(frame)
        if time is None or (times and time <= times[-1]):
            continue
        if times:
            last_gap = time - times[-1]
        times.append(time)
        before = len(chooser.chosen)
        chooser.offer(time)
        current: np.ndarray | None = None
        for number in chooser.chosen[before:]:
            if number < chooser.frame:
                assert previous is not None
                if previous[1] is None:
                    previous = (previous[0], pictures(previous[0]))
                picked.append(previous[1])
            else:
                current = pictures(frame) if current is None else current
                picked.append(current)
        if chooser.done:
            break
        previous = (frame, current)
    if not chooser.done and previous is not None:
        last = previous[0]
        shown = Fraction(last.duration) * Fraction(last.time_base or stream.time_base) if last.duration else last_gap
        before = len(chooser.chosen)
        chooser.end(times[-1] + shown)
        for _ in chooser.chosen[before:]:
            if previous[1] is None:
                previous = (previous[0], pictures(previous[0]))
            picked.append(previous[1])
        if not chooser.done:
            _raise_corrupt(decoded, path)
            # A target's choice does not depend on the count, so a shorter count's frames are the first ones chosen.
            fits = [c for c in counts if c <= len(chooser.chosen)]
            if fits:
                return np.stack(picked[:fits[0]]), chooser.chosen[:fits[0]], chooser.times[:fits[0]]
            raise _too_short_by_time(decoded.seen, times, shown, counts, target_fps)
    if not chooser.done:
        _raise_corrupt(decoded, path)
        raise BadInput(f"too short: {decoded.seen} decodable frames, no timestamps to time them by")
    return np.stack(picked), chooser.chosen, chooser.times


def _too_short_by_time(seen: int, times: list[Fraction], shown: Fraction, counts: list[int],
                       target_fps: float) -> BadInput:
    """Why a clip timed by its timestamps fills not even the shortest of `counts`, and what would make it fit."""
    shortest = counts[-1]
    # The last target is taken when (count - 1) / fps <= the frames' span + half the last one's showing.
    reach = float(times[-1] - times[0] + shown / 2)
    min_fps = (shortest - 1) / reach if reach > 0 else math.inf
    which = " (the shortest frame bucket)" if len(counts) > 1 else ""
    return BadInput(f"too short: {seen} decodable frames with uneven timestamps: the clip lasts "
                    f"{float(times[-1] - times[0] + shown):.2f} s, {shortest} frames at {target_fps:.4g} fps"
                    f"{which} need {NearestFrames(shortest, target_fps).needed_seconds(shown):.2f} s; "
                    f"{_remedies(len(times), shortest, min_fps)}")


def _raise_corrupt(decoded: _Decoded, path: Path) -> None:
    """A decoder error that cut the frames short is the reason, not the length."""
    if decoded.error is not None:
        raise BadInput(f"corrupt video: decoding failed after {decoded.seen} frames "
                       f"({_reason(decoded.error, path)})") from decoded.error


def _remedies(have: int, need: int, min_fps: float) -> str:
    """What would make a clip of `have` frames give `need` (the CLI's options by name); `min_fps` is the lowest target
    rate at which the clip is long enough."""
    if have < need:
        return f"the clip has fewer frames than {need} at any rate: use a shorter frame bucket (--frames)"
    # By index, `need` frames fit in `have` when they are at most (have - 1) / (need - 1) source frames apart.
    apart = (have - 1) // (need - 1) if need > 1 else 1
    return (f"use a higher --fps (at least {math.ceil(min_fps * 100) / 100:g}), a --frame-stride of at most "
            f"{max(1, apart)}, or a shorter frame bucket (--frames)")


def _reason(err: BaseException, path: Path) -> str:
    """A decoder error's first line, short, naming the file by its name only."""
    return first_line(err)[:200].replace(str(path), path.name)


def decode_image(path: str | Path, buckets: list[tuple[int, int]]) -> Clip:
    """A single image as a one-frame clip, resized and center-cropped to the bucket closest in aspect ratio."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise BadInput("missing file")
    try:
        with Image.open(path) as image:  # reads the header only
            size = (image.height, image.width)
    except Image.DecompressionBombError as err:  # PIL's own bound, above ours (before, it ended the whole job)
        raise BadInput(_pil_bomb(err)) from err
    except (UnidentifiedImageError, OSError) as err:
        raise BadInput(f"unreadable image ({first_line(err)[:200]})") from err
    _refuse_frame_size(*size, buckets)
    return Clip(load_image(path, choose_bucket(*size, buckets), what="image"), 0.0, 0.0, 1.0, size)


def _pil_bomb(err: Exception) -> str:
    """The reason for an image PIL will not even open (more than twice its MAX_IMAGE_PIXELS)."""
    return (f"image too large to open ({first_line(err)[:200]}); prep's limit is {MAX_FRAME_SIDE} pixels a side and "
            f"{MAX_FRAME_PIXELS:,} pixels a frame; scale it down first")


def load_image(path: str | Path, bucket: tuple[int, int], what: str = "conditioning image") -> np.ndarray:
    """An image as uint8 [1, H, W, 3], resized and center-cropped to the bucket like the video."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"missing {what} {path.name}")
    try:
        with Image.open(path) as image:
            problem = frame_size_problem(image.height, image.width, [bucket])  # before the pixels are read
            if problem:
                raise BadInput(problem if what == "image" else f"{what} {path.name}: {problem}")
            image = image.convert("RGB")
            rh, rw = resized_size(image.height, image.width, bucket)
            image = image.resize((rw, rh), Image.Resampling.BOX if rh <= image.height else Image.Resampling.BICUBIC)
            array = np.array(image)  # a writable copy (torch warns on read-only arrays)
    except Image.DecompressionBombError as err:
        raise BadInput(f"{what} {path.name}: {_pil_bomb(err)}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise BadInput(f"unreadable {what} {path.name} ({first_line(err)[:200]})") from err
    return center_crop(array, bucket)[None]


def to_model_input(frames: np.ndarray | torch.Tensor, device: str | torch.device, dtype: torch.dtype,
                   memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 [F, H, W, 3] (or a batch [B, F, H, W, 3]) -> [B, 3, F, H, W] in [-1, 1] on `device`.

    With memory_format=torch.channels_last_3d the decoded frame order is kept (no transposing copy)."""
    tensor = torch.as_tensor(frames)
    if tensor.dim() == 4:
        tensor = tensor[None]
    tensor = tensor.to(device, non_blocking=True).permute(0, 4, 1, 2, 3).to(torch.float32)
    return (tensor / 127.5 - 1.0).to(dtype).contiguous(memory_format=memory_format)
