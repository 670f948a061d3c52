"""Synthetic video datasets: real mp4 clips of a coloured shape moving over a background, captioned with what moves
where ("a red square moves left"), plus deliberately broken files, in any caption layout prep reads (one writer a
layout in WRITERS). Used by tests, the benchmark and the demo.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cogvx_dist.core.caption_layouts import (
    COGVIDEO_CAPTIONS,
    COGVIDEO_IMAGES,
    COGVIDEO_VIDEOS,
    LAYOUTS,
    unknown_layout,
)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BROKEN_KINDS = ("truncated", "random_bytes", "empty", "too_short", "missing", "empty_prompt")
Entry = tuple[str, str, "str | None"]
"""(video, prompt, image or None) of one listed input, paths relative to the dataset root."""


@dataclass
class SyntheticDataset:
    """What `make_synthetic_dataset` wrote."""

    root: Path
    """Dataset root."""
    data: Path
    """What to pass as prep's data argument (the root, or the CSV/JSONL file)."""
    good: list[str]
    """Sources (video paths relative to the root) that prep must encode."""
    bad: dict[str, str]
    """Source -> kind of breakage (one of BROKEN_KINDS) that prep must report."""
    prompts: dict[str, str]
    """Source -> caption."""


def render_clip(colour: str, shape: str, direction: str, frames: int, height: int, width: int,
                seed: int = 0) -> np.ndarray:
    """uint8 [frames, height, width, 3]: the shape crossing a dim textured background in `direction`."""
    rng = np.random.default_rng(seed)
    background = (rng.integers(20, 60, size=(1, 1, 3)) + rng.integers(0, 12, size=(height, width, 3))).astype(np.uint8)
    size = max(4, min(height, width) // 3)
    dx, dy = DIRECTIONS[direction]
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        progress = t / max(1, frames - 1)
        # Travel from one side to the other along the direction; stay centred on the other axis.
        cx = width / 2 + dx * (progress - 0.5) * (width - size)
        cy = height / 2 + dy * (progress - 0.5) * (height - size)
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (size / 2) ** 2
        else:
            mask = (abs(xx - cx) <= size / 2) & (abs(yy - cy) <= size / 2)
        frame = background.copy()
        frame[mask] = COLOURS[colour]
        out[t] = frame
    return out


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Encode uint8 [F, H, W, 3] frames as an H.264 mp4 (even sizes; yuv420p, as players expect)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def caption(colour: str, shape: str, direction: str) -> str:
    """The caption of a synthetic clip."""
    return f"a {colour} {shape} moves {direction}"


def make_synthetic_dataset(
    root: str | Path,
    count: int = 8,
    frames: int = 16,
    height: int = 48,
    width: int = 64,
    fps: int = 8,
    seed: int = 0,
    layout: str = "folder",
    broken: bool = False,
    images: bool = False,
    stills: int = 0,
) -> SyntheticDataset:
    """Write `count` good clips (and, with broken=True, one input of each BROKEN_KIND) in the given caption layout
    (a name in cogvx_dist.core.caption_layouts.LAYOUTS, written by its entry in WRITERS).

    With images=True each clip also gets a PNG conditioning image (its first frame), for image-to-video families.
    `stills` single images (PNG, JPEG and WebP in turn, a shape on the background, captioned "a red circle") are
    listed beside the clips as samples of their own.
    """
    if layout not in LAYOUTS:
        raise ValueError(unknown_layout(layout, auto=False))
    writer = WRITERS[layout]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    entries = _good_clips(root, writer.media, count, frames, height, width, fps, seed, images)
    entries += _still_images(root, writer.media, stills, height, width, seed)
    good = [name for name, _, _ in entries]
    bad = _broken_inputs(root, writer.media, frames, height, width, fps, seed) if broken else {}
    for name, kind in bad.items():
        entries.append((name, "" if kind == "empty_prompt" else f"broken clip {kind.replace('_', ' ')}", None))
    data_arg, listed = writer.write(root, entries, images)
    # A layout that finds its media on disk cannot name a missing file: such an input is not one prep sees.
    bad = {name: kind for name, kind in bad.items() if name in listed}
    prompts = {name: text for name, text, _ in entries if name in listed}
    return SyntheticDataset(root, data_arg, good, bad, prompts)


def _good_clips(root: Path, sub: str, count: int, frames: int, height: int, width: int, fps: int, seed: int,
                images: bool) -> list[tuple[str, str, str | None]]:
    """Write the captioned clips (and their first frames as PNGs with `images`): (video, prompt, image) each."""
    rng = random.Random(seed)
    entries: list[tuple[str, str, str | None]] = []
    for i in range(count):
        colour, shape, direction = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS))
        clip = render_clip(colour, shape, direction, frames, height, width, seed=seed * 100003 + i)
        name = f"{sub}clip_{i:04d}.mp4"
        write_mp4(root / name, clip, fps)
        image = None
        if images:
            from PIL import Image

            image = f"{sub}clip_{i:04d}.png"
            Image.fromarray(clip[0]).save(root / image)
        entries.append((name, caption(colour, shape, direction), image))
    return entries


STILL_FORMATS = (".png", ".jpg", ".webp")


def _still_images(root: Path, sub: str, count: int, height: int, width: int,
                  seed: int) -> list[tuple[str, str, None]]:
    """Write `count` captioned single images (the formats in turn): (image, prompt, None) each."""
    from PIL import Image

    rng = random.Random(seed + 7)
    entries: list[tuple[str, str, None]] = []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        pixels = render_clip(colour, shape, "left", 1, height, width, seed=seed * 7919 + i)[0]
        name = f"{sub}still_{i:04d}{STILL_FORMATS[i % len(STILL_FORMATS)]}"
        Image.fromarray(pixels).save(root / name, quality=95)
        entries.append((name, f"a {colour} {shape}", None))
    return entries


def _broken_inputs(root: Path, sub: str, frames: int, height: int, width: int, fps: int, seed: int) -> dict[str, str]:
    """One input of each BROKEN_KIND: source -> kind (the missing one is listed, never written)."""
    sample = write_mp4(root / f"{sub}_donor.mp4", render_clip("red", "square", "left", frames, height, width), fps)
    data = sample.read_bytes()
    sample.unlink()
    files = {
        "truncated": data[: len(data) // 2],
        "random_bytes": np.random.default_rng(seed).integers(0, 256, size=4096, dtype=np.uint8).tobytes(),
        "empty": b"",
    }
    bad: dict[str, str] = {}
    for kind, payload in files.items():
        name = f"{sub}broken_{kind}.mp4"
        (root / name).write_bytes(payload)
        bad[name] = kind
    short = f"{sub}broken_too_short.mp4"
    write_mp4(root / short, render_clip("blue", "circle", "up", 3, height, width), fps)
    bad[short] = "too_short"
    bad[f"{sub}broken_missing.mp4"] = "missing"
    no_prompt = f"{sub}broken_empty_prompt.mp4"
    write_mp4(root / no_prompt, render_clip("green", "square", "down", frames, height, width), fps)
    bad[no_prompt] = "empty_prompt"
    return bad


# ---------------------------------------------------------------------------------------------- one writer a layout
@dataclass(frozen=True)
class LayoutWriter:
    """How `make_synthetic_dataset` writes one caption layout."""

    write: Callable[[Path, list[Entry], bool], tuple[Path, set[str]]]
    """(root, entries, whether conditioning images are listed) -> (what to pass as prep's data argument, the
    sources the files list)."""
    media: str = "videos/"
    """Folder under the root the clips and images go in ("": the root itself)."""


def _write_folder(root: Path, entries: list[Entry], images: bool) -> tuple[Path, set[str]]:
    listed = set()
    for video, prompt, _ in entries:
        # A missing video cannot be listed in this layout; an empty caption file is an empty prompt.
        if (root / video).exists():
            (root / video).with_suffix(".txt").write_text(prompt + "\n")
            listed.add(video)
    return root, listed


def _write_csv(root: Path, entries: list[Entry], images: bool) -> tuple[Path, set[str]]:
    path = root / LAYOUTS["csv"].files[0]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "prompt", "image"] if images else ["video", "prompt"])
        for video, prompt, image in entries:
            writer.writerow([video, prompt, image or ""] if images else [video, prompt])
    return path, {video for video, _, _ in entries}


def _write_jsonl(root: Path, entries: list[Entry], images: bool) -> tuple[Path, set[str]]:
    path = root / LAYOUTS["jsonl"].files[0]
    with open(path, "w") as handle:
        for video, prompt, image in entries:
            item = {"video": video, "prompt": prompt}
            if image:
                item["image"] = image
            handle.write(json.dumps(item) + "\n")
    return path, {video for video, _, _ in entries}


def _write_cogvideo(root: Path, entries: list[Entry], images: bool) -> tuple[Path, set[str]]:
    (root / COGVIDEO_VIDEOS).write_text("".join(f"{v}\n" for v, _, _ in entries))
    (root / COGVIDEO_CAPTIONS[0]).write_text("".join(f"{p}\n" for _, p, _ in entries))
    if images:
        (root / COGVIDEO_IMAGES).write_text("".join(f"{i or ''}\n" for _, _, i in entries))
    return root, {video for video, _, _ in entries}


WRITERS: dict[str, LayoutWriter] = {
    "cogvideo": LayoutWriter(_write_cogvideo),
    "jsonl": LayoutWriter(_write_jsonl),
    "csv": LayoutWriter(_write_csv),
    "folder": LayoutWriter(_write_folder, media=""),
}
"""Layout name (caption_layouts.LAYOUTS) -> its writer; every layout of the table has one."""
