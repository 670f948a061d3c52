"""The caption layouts (the table in cogvx_dist/core/caption_layouts.py), read into one list of records.

One reader per layout in READERS, keyed by the table's names; `auto` picks the layout from the table's file names
and suffixes. Today:

- cogvideo: `prompts.txt` (or `prompt.txt`, as CogVideo's launch scripts and finetrainers name it) + `videos.txt`
  (+ `images.txt` for I2V), one entry per line, line i matching line i; other names with `ListFiles`;
- csv / jsonl: a file with `video` and `prompt` columns (optional `image`);
- folder: `name.mp4` + `name.txt` pairs (any depth; `name.png`/`name.jpg` is the conditioning image if present),
  and `name.png` + `name.txt` pairs without a video of that name (single images).

In every layout the `video` entry may name an image (.png, .jpg, .jpeg, .webp): a single-image sample, trained as a
one-frame clip.

Paths are relative to the dataset root (the folder, or the folder holding the CSV/JSONL file). A line that cannot be
understood (bad JSON, a row without a video) is a CogvxError naming the file and line; a record that is readable but
unusable (empty prompt, missing caption file) is returned with `problem` set and later lands in errors.jsonl.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cogvx_dist.core.caption_layouts import (
    AUTO,
    COGVIDEO_CAPTIONS,
    COGVIDEO_IMAGES,
    COGVIDEO_VIDEOS,
    LAYOUTS,
    unknown_layout,
)
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.shard_format import sample_key

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


_SPECIAL_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                  (stat.S_ISBLK, "block device"))


def special_kind(path: Path) -> str | None:
    """"FIFO", "socket", "character device" or "block device" when `path` (or what a link at it points to) is one;
    None for a regular file, a folder or nothing there. It is stat'ed, never opened: opening a FIFO waits for a
    writer, forever when none comes, and a device may stream without end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), None)


def not_regular(kind: str) -> str:
    """The reason errors.jsonl gives for an input that is a special file of this kind."""
    return f"not a regular file ({kind})"


@dataclass(frozen=True)
class ListFiles:
    """The CogVideo layout's list files, relative to the dataset folder (None: the usual names)."""

    captions: str | None = None
    videos: str | None = None
    images: str | None = None

    def resolve(self, root: Path) -> tuple[Path, Path, Path | None]:
        """(videos, captions, images or None): the given names, or the usual ones that exist."""
        videos = root / (self.videos or COGVIDEO_VIDEOS)
        if self.captions:
            captions = root / self.captions
        else:
            found = [root / name for name in COGVIDEO_CAPTIONS if (root / name).is_file()]
            if len(found) > 1:
                raise CogvxError(f"{root} holds both {found[0].name} and {found[1].name}; say which holds the "
                                 "captions with --caption-file")
            captions = found[0] if found else root / COGVIDEO_CAPTIONS[0]
        images = root / (self.images or COGVIDEO_IMAGES)
        for path in (videos, captions):
            if not path.is_file():
                raise CogvxError(f"{path} is missing (the CogVideo layout needs a caption list "
                                 f"({' or '.join(COGVIDEO_CAPTIONS)}, or --caption-file) and {COGVIDEO_VIDEOS} "
                                 "(or --video-file))")
        if self.images and not images.is_file():
            raise CogvxError(f"{images} is missing (--image-file)")
        return videos, captions, images if images.is_file() else None


@dataclass(frozen=True)
class Record:
    """One training example as the user listed it."""

    source: str
    """Identity of the sample: the video path relative to the root (with `#N` for the Nth repeat of a path)."""
    video: str
    """Video path relative to the root."""
    prompt: str
    """Caption (stripped)."""
    image: str | None
    """Conditioning image path relative to the root (I2V), or None to use the video's first frame."""
    origin: str
    """Where the record came from, `file:line`, for error messages."""
    problem: str | None = None
    """Why this record cannot be used, found while reading the inputs (None when fine so far)."""

    @property
    def key(self) -> str:
        """WebDataset key of the sample (schema.sample_key of the source)."""
        return sample_key(self.source)

    @property
    def is_image(self) -> bool:
        """True when the listed media is a single image (a one-frame sample) rather than a video."""
        return self.video.lower().endswith(IMAGE_EXTENSIONS)


def detect_layout(data: Path) -> str:
    """The layout of `data`: a file by its suffix, a folder by the first layout of the table whose files it holds,
    else the table's layout without files."""
    if data.is_file():
        suffix = data.suffix.lower()
        for name, layout in LAYOUTS.items():
            if suffix in layout.suffixes:
                return name
        suffixes = [suffix for layout in LAYOUTS.values() for suffix in layout.suffixes]
        raise CogvxError(f"{data}: a dataset file must be {_either(suffixes)}")
    if not data.is_dir():
        raise CogvxError(f"dataset {data} does not exist")
    for name, layout in LAYOUTS.items():
        if not layout.files or any((data / file).is_file() for file in layout.files):
            return name
    raise CogvxError(f"{data} holds none of {_either(_layout_files())} (and no layout reads a bare folder)")


def read_records(data: str | Path, layout: str = AUTO,
                 lists: ListFiles | None = None) -> tuple[Path, list[Record]]:
    """(dataset root, records in a deterministic order) for a dataset in any layout of the table."""
    data, lists = Path(data), lists or ListFiles()
    root, rows = READERS[_layout_of(data, layout, lists)](data, lists)
    return root, _unique_sources(rows)


def caption_list(data: str | Path, layout: str = AUTO, lists: ListFiles | None = None) -> Path | None:
    """The caption file a CogVideo-layout dataset is read from (None for the other layouts)."""
    data, lists = Path(data), lists or ListFiles()
    return lists.resolve(data)[1] if _layout_of(data, layout, lists) == "cogvideo" else None


def _layout_of(data: Path, layout: str, lists: ListFiles) -> str:
    """The layout to read `data` in: the one given, or (auto) the one its files show."""
    if layout == AUTO:
        # Naming a list file is saying the folder holds CogVideo lists, whatever their names.
        return "cogvideo" if lists != ListFiles() and data.is_dir() else detect_layout(data)
    if layout not in LAYOUTS:
        raise CogvxError(unknown_layout(layout))
    return layout


def _layout_files() -> list[str]:
    return [file for layout in LAYOUTS.values() for file in layout.files]


def _either(names: list[str]) -> str:
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


_Row = tuple[str, str, "str | None", str, "str | None"]  # video, prompt, image, origin, problem


def _unique_sources(rows: list[_Row]) -> list[Record]:
    # A video listed twice (e.g. with two captions) is two samples: repeats get `#2`, `#3`... so keys stay unique and
    # stable across runs.
    seen: dict[str, int] = {}
    records = []
    for video, prompt, image, origin, problem in rows:
        count = seen.get(video, 0) + 1
        seen[video] = count
        source = video if count == 1 else f"{video}#{count}"
        if problem is None and not prompt:
            problem = "empty prompt"
        records.append(Record(source, video, prompt, image, origin, problem))
    return records


def _read_utf8(path: Path) -> str:
    """The file's text with line endings kept as they are; bytes that are not UTF-8 are a CogvxError naming the
    line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CogvxError(f"{path}:{line}: not valid UTF-8") from err


def _read_lines(path: Path, strip_trailing: bool = True) -> list[str]:
    lines = _read_utf8(path).splitlines()
    while strip_trailing and lines and not lines[-1].strip():  # trailing blank lines are not entries
        lines.pop()
    return lines


def _read_cogvideo(videos_path: Path, prompts_path: Path, images_path: Path | None) -> list[_Row]:
    # An empty last prompt is a real (bad) entry, so prompts and images keep blank lines until matched to videos.
    videos, prompts = _read_lines(videos_path), _read_lines(prompts_path, strip_trailing=False)
    images = _read_lines(images_path, strip_trailing=False) if images_path is not None else None
    if len(prompts) > len(videos) and not any(p.strip() for p in prompts[len(videos):]):
        prompts = prompts[: len(videos)]
    if images is not None and len(images) > len(videos) and not any(i.strip() for i in images[len(videos):]):
        images = images[: len(videos)]
    if len(prompts) != len(videos):
        raise CogvxError(f"{prompts_path} has {len(prompts)} lines but {videos_path} has {len(videos)}; "
                         "they must match")
    if images is not None and len(images) != len(videos):
        raise CogvxError(f"{images_path} has {len(images)} lines but {videos_path} has {len(videos)}; they must match")
    rows = []
    for i, (video, prompt) in enumerate(zip(videos, prompts)):
        if not video.strip():
            raise CogvxError(f"{videos_path}:{i + 1}: empty line (every line names a video)")
        image = images[i].strip() or None if images is not None else None
        rows.append((video.strip(), prompt.strip(), image, f"{videos_path.name}:{i + 1}", None))
    return rows


def _read_csv(path: Path) -> list[_Row]:
    # Decoded whole first so that a byte that is not UTF-8 is reported with its line (csv reads lazily).
    with io.StringIO(_read_utf8(path), newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for needed in ("video", "prompt"):
            if needed not in columns:
                raise CogvxError(f"{path}:1: no {needed!r} column (columns: {', '.join(columns) or 'none'})")
        rows = []
        try:
            for row in reader:
                line = reader.line_num
                if None in row:  # more cells than header columns
                    raise CogvxError(f"{path}:{line}: more cells than the header has columns")
                video = (row.get("video") or "").strip()
                if not video:
                    raise CogvxError(f"{path}:{line}: empty 'video' cell")
                image = (row.get("image") or "").strip() or None
                rows.append((video, (row.get("prompt") or "").strip(), image, f"{path.name}:{line}", None))
        except csv.Error as err:
            raise CogvxError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err
    return rows


def _read_jsonl(path: Path) -> list[_Row]:
    rows = []
    for i, line in enumerate(_read_lines(path)):
        where = f"{path}:{i + 1}"
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise CogvxError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(item, dict):
            raise CogvxError(f"{where}: expected a JSON object with 'video' and 'prompt'")
        video = item.get("video")
        if not isinstance(video, str) or not video.strip():
            raise CogvxError(f"{where}: no 'video' path")
        prompt = item.get("prompt", "")
        if not isinstance(prompt, str):
            raise CogvxError(f"{where}: 'prompt' must be a string")
        image = item.get("image")
        if image is not None and not isinstance(image, str):
            raise CogvxError(f"{where}: 'image' must be a string path")
        rows.append((video.strip(), prompt.strip(), (image or "").strip() or None, f"{path.name}:{i + 1}", None))
    return rows


def _read_folder(root: Path) -> list[_Row]:
    specials = _special_files(root)
    rows = []
    videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    for video in videos:
        rel = video.relative_to(root).as_posix()
        caption = video.with_suffix(".txt")
        image = next((video.with_suffix(e) for e in IMAGE_EXTENSIONS if video.with_suffix(e).is_file()), None)
        image_rel = image.relative_to(root).as_posix() if image else None
        if caption in specials:
            reason = f"caption file {caption.name} is {not_regular(specials.pop(caption))}"
            rows.append((rel, "", image_rel, rel, reason))
            continue
        if not caption.is_file():
            rows.append((rel, "", image_rel, rel, f"no caption file {caption.name}"))
            continue
        try:
            prompt = caption.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            rows.append((rel, "", image_rel, rel, f"caption file {caption.name} is not valid UTF-8"))
            continue
        rows.append((rel, prompt, image_rel, rel, None))
    rows.extend(_folder_images(root, {video.with_suffix("") for video in videos}, specials))
    # Every other special file is an input prep cannot use, whatever its name: listed with its reason, never opened.
    for path, kind in sorted(specials.items()):
        rel = path.relative_to(root).as_posix()
        rows.append((rel, "", None, rel, not_regular(kind)))
    if not rows:
        raise CogvxError(f"{root}: no videos ({', '.join(VIDEO_EXTENSIONS)}), no captioned images and none of "
                         f"{_either(_layout_files())}")
    return rows


def _special_files(root: Path) -> dict[Path, str]:
    """The FIFOs, sockets and devices under `root`, by kind. The folder listing's own entry types tell regular files
    and folders apart without a stat each, so only the rest is stat'ed; folders linked to are not entered, as rglob
    does not enter them."""
    found: dict[Path, str] = {}
    folders = [root]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                elif not entry.is_file() and not entry.is_dir():
                    kind = special_kind(Path(entry.path))
                    if kind:
                        found[Path(entry.path)] = kind
    return found


def _folder_images(root: Path, video_stems: set[Path], specials: dict[Path, str]) -> list[_Row]:
    """Images with a caption file of their name and no video of their name (those condition the video instead). A
    special file as the caption is the image's reason (and taken out of `specials`)."""
    rows = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption = image.with_suffix(".txt")
        if image.with_suffix("") in video_stems:
            continue
        rel = image.relative_to(root).as_posix()
        if caption in specials:
            rows.append((rel, "", None, rel, f"caption file {caption.name} is {not_regular(specials.pop(caption))}"))
            continue
        if not caption.is_file():
            continue
        try:
            rows.append((rel, caption.read_text(encoding="utf-8").strip(), None, rel, None))
        except UnicodeDecodeError:
            rows.append((rel, "", None, rel, f"caption file {caption.name} is not valid UTF-8"))
    return rows


# ---------------------------------------------------------------------------------------------- one reader a layout
_Reader = Callable[[Path, ListFiles], tuple[Path, list[_Row]]]
"""(data as given, CogVideo list names) -> (dataset root, rows in the order listed)."""


def _cogvideo(data: Path, lists: ListFiles) -> tuple[Path, list[_Row]]:
    return data, _read_cogvideo(*lists.resolve(data))


def _metadata_file(layout: str, parse: Callable[[Path], list[_Row]], data: Path,
                   lists: ListFiles) -> tuple[Path, list[_Row]]:
    """A layout of one file: `data` itself, or the first of the layout's files in the folder `data`."""
    path = data
    if data.is_dir():
        candidates = [data / name for name in LAYOUTS[layout].files]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        raise CogvxError(f"{layout} dataset file {path} does not exist")
    return path.parent, parse(path)


def _folder(data: Path, lists: ListFiles) -> tuple[Path, list[_Row]]:
    if not data.is_dir():
        raise CogvxError(f"dataset folder {data} does not exist")
    return data, _read_folder(data)


READERS: dict[str, _Reader] = {
    "cogvideo": _cogvideo,
    "jsonl": functools.partial(_metadata_file, "jsonl", _read_jsonl),
    "csv": functools.partial(_metadata_file, "csv", _read_csv),
    "folder": _folder,
}
"""Layout name (cogvx_dist.core.caption_layouts.LAYOUTS) -> its reader; every layout of the table has one."""
