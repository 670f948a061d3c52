"""The caption layouts prep reads: the ways a dataset pairs each video with its prompt, in one table.

`LAYOUTS` is the only list of them. Prep's config check, `cogvx prep --layout` (its choices and help) and prep's
error messages take the names and descriptions from it; auto detection takes the file names and suffixes. Each
layout's code is keyed by its name: the reader in `data_prep/inputs.py` (READERS) and the synthetic-dataset writer
in `cogvx_dist/core/synthetic_videos.py` (WRITERS), and tests/unit/test_prep.py fails, naming the layout, when
either is missing. A new layout is a row here plus its reader and writer.

The table lives in the core because all three layers use it: data_prep reads the layouts, the core writes them for
the tests and the demo, and the CLI offers them.
"""

from __future__ import annotations

from dataclasses import dataclass

COGVIDEO_CAPTIONS = ("prompts.txt", "prompt.txt")
"""The CogVideo layout's caption list, the name written first: CogVideo's README says prompts.txt, its launch
scripts (and finetrainers) prompt.txt."""
COGVIDEO_VIDEOS = "videos.txt"
"""The CogVideo layout's video list."""
COGVIDEO_IMAGES = "images.txt"
"""The CogVideo layout's conditioning-image list (image-to-video; optional)."""


@dataclass(frozen=True)
class CaptionLayout:
    """One way of pairing videos with prompts (the table's key is its name)."""

    description: str
    """One line saying what the dataset looks like, for `--help` and messages."""
    files: tuple[str, ...] = ()
    """Files in a dataset folder that hold this layout's captions or lists, the name a writer uses first. Auto
    detection reads a folder in the first layout (in table order) one of whose files it holds; the layout without
    files is the fallback and comes last."""
    suffixes: tuple[str, ...] = ()
    """Suffixes (lower case) of a dataset given as a single file that auto detection reads in this layout."""


LAYOUTS: dict[str, CaptionLayout] = {
    # The order is auto detection's precedence: a folder holding both txt lists and a metadata file is read as
    # CogVideo lists, one holding metadata.jsonl and metadata.csv as JSONL.
    "cogvideo": CaptionLayout(
        f"{' or '.join(COGVIDEO_CAPTIONS)} + {COGVIDEO_VIDEOS} [+ {COGVIDEO_IMAGES}], line i matching line i",
        files=(COGVIDEO_VIDEOS, *COGVIDEO_CAPTIONS),
    ),
    "jsonl": CaptionLayout("metadata.jsonl or any .jsonl/.json file, one {video, prompt[, image]} object a line",
                           files=("metadata.jsonl",), suffixes=(".jsonl", ".json")),
    "csv": CaptionLayout("metadata.csv or any .csv file with video, prompt[, image] columns",
                         files=("metadata.csv",), suffixes=(".csv",)),
    "folder": CaptionLayout("name.mp4 + name.txt pairs at any depth (name.png beside a video: its conditioning "
                            "image; name.png + name.txt alone: a single-image sample)"),
}
"""Layout name -> what it is and the files it is known by. Paths inside any layout are relative to the dataset
root (the folder, or the folder holding the file)."""

AUTO = "auto"
"""The layout setting that picks the layout from the data: a file by its suffix, a folder by its files (the first
layout of the table whose files it holds, else the one without files)."""


def layout_choices() -> tuple[str, ...]:
    """What prep's `layout` setting accepts: auto, then every layout's name."""
    return (AUTO, *LAYOUTS)


def describe_layouts() -> str:
    """Every choice with its description on one line, for `--help`."""
    detected = ", ".join(name for name, layout in LAYOUTS.items() if layout.files)
    fallback = ", ".join(name for name, layout in LAYOUTS.items() if not layout.files)
    described = "; ".join(f"{name}: {layout.description}" for name, layout in LAYOUTS.items())
    return (f"{AUTO}: a file by its suffix, a folder as the first of {detected} whose files it holds, else "
            f"{fallback}; {described}")


def unknown_layout(value: str, auto: bool = True) -> str:
    """The message for a layout name that is not in the table (`auto`: whether auto is one of the choices)."""
    choices = layout_choices() if auto else tuple(LAYOUTS)
    return f"layout must be one of {', '.join(choices)}, not {value!r}"
