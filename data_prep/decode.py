"""Video decoding with PyAV: frame selection by stride or target fps, bucket choice, resize + center crop.

Decoding returns uint8 frames [F, H, W, 3]; `to_model_input` moves them to the encoder's device and scales them to
[-1, 1] there (uint8 is 4x less to copy to a GPU than float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    """Effective frame rate of the selected frames."""
    source_fps: float
    """Frame rate of the source stream."""
    stride: float
    """Source frames per selected frame."""
    source_size: tuple[int, int]
    """(height, width) of the source video."""


def choose_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height x width (log ratio; ties go to the earlier bucket)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


def resized_size(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Size to scale to so that the bucket is covered, before the center crop (aspect ratio kept)."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    return max(bh, round(height * scale)), max(bw, round(width * scale))


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


def decode_video(
    path: str | Path,
    frames: int,
    buckets: list[tuple[int, int]],
    target_fps: float | None = None,
    stride: int | None = None,
    default_fps: float = 8.0,
) -> Clip:
    """Decode `frames` frames of a video, resized and center-cropped to the best bucket.

    Raises BadInput (missing, empty, unreadable, no video stream, too short) with the reason.
    """
    import av

    path = Path(path)
    if not path.exists():
        raise BadInput("missing file")
    if path.is_dir():
        raise BadInput("is a folder, not a video file")
    if path.stat().st_size == 0:
        raise BadInput("empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as err:
        raise BadInput(f"unreadable video ({_reason(err, path)})") from err
    try:
        if not container.streams.video:
            raise BadInput("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate) if stream.average_rate else float(default_fps)
        height, width = stream.codec_context.height, stream.codec_context.width
        if not height or not width:
            raise BadInput("video stream has no frame size")
        bucket = choose_bucket(height, width, buckets)
        wanted, step = frame_indices(frames, source_fps, target_fps, stride)
        array = _selected_frames(container, stream, wanted, step, bucket, resized_size(height, width, bucket), path)
    finally:
        container.close()
    return Clip(array, source_fps / step, source_fps, step, (height, width))


def _selected_frames(container: Any, stream: Any, wanted: list[int], step: float, bucket: tuple[int, int],
                     resized: tuple[int, int], path: Path) -> np.ndarray:
    """The wanted frame indices of the stream, resized and cropped to the bucket, as uint8 [F, H, W, 3]."""
    import av

    wanted_set, last = set(wanted), wanted[-1]
    picked: dict[int, np.ndarray] = {}
    seen = 0
    try:
        for index, frame in enumerate(container.decode(stream)):
            seen = index + 1
            if index in wanted_set:
                # swscale does resize + RGB conversion in one pass; area averaging avoids aliasing on downscale.
                rgb = frame.reformat(width=resized[1], height=resized[0], format="rgb24",
                                     interpolation="AREA").to_ndarray()
                picked[index] = center_crop(rgb, bucket)
            if index >= last:
                break
    except (av.FFmpegError, OSError, ValueError) as err:
        if len(picked) < len(wanted):
            raise BadInput(f"corrupt video: decoding failed after {seen} frames ({_reason(err, path)})") from err
    if len(picked) < len(wanted):
        raise BadInput(f"too short: {seen} decodable frames, need {last + 1} ({len(wanted)} frames at stride "
                       f"{step:g})")
    return np.stack([picked[i] for i in wanted])


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
        with Image.open(path) as image:
            size = (image.height, image.width)
    except (UnidentifiedImageError, OSError) as err:
        raise BadInput(f"unreadable image ({first_line(err)[:200]})") from err
    return Clip(load_image(path, choose_bucket(*size, buckets), what="image"), 0.0, 0.0, 1.0, size)


def load_image(path: str | Path, bucket: tuple[int, int], what: str = "conditioning image") -> np.ndarray:
    """An image as uint8 [1, H, W, 3], resized and center-cropped to the bucket like the video."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"missing {what} {path.name}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            rh, rw = resized_size(image.height, image.width, bucket)
            image = image.resize((rw, rh), Image.Resampling.BOX if rh <= image.height else Image.Resampling.BICUBIC)
            array = np.array(image)  # a writable copy (torch warns on read-only arrays)
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
