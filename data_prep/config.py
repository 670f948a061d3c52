"""Prep settings: one dataclass, loaded from YAML with CLI overrides, checked against the model family."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvx_dist.core.caption_layouts import AUTO, layout_choices, unknown_layout
from cogvx_dist.core.devices import DTYPE_NAMES
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import SIZE_MULTIPLE
from cogvx_dist.core.units import parse_bytes, parse_size

PROMPT_SLOT = "{prompt}"
"""Where a caption goes in prep's prompt template."""


@dataclass
class PrepConfig:
    """Everything one prep job needs; every process of a job gets the same config."""

    model: str = ""
    """Diffusers-format CogVideoX checkpoint (folder or hub id) whose tokenizer, T5 and VAE encode the data."""
    data: str = ""
    """Dataset: a folder (CogVideo txt lists, metadata.csv/.jsonl, or name.mp4 + name.txt pairs) or a CSV/JSONL file."""
    out: str = ""
    """Output folder for shards, manifest.json, errors.jsonl and per-rank progress files (parts/), or an object
    store URL (s3://, gs://) that a local staging folder is mirrored to."""
    prompt_prefix: str = ""
    """Text put before every caption before T5 encodes it, e.g. a trigger word "<sks> " (the diffusers example's
    --id_token); the same as prompt_template "PREFIX{prompt}"."""
    prompt_template: str = ""
    """What T5 encodes for each caption, with {prompt} where the caption goes, e.g. "{prompt}, in the style of
    <sks>"; empty: the caption itself. Recorded in the manifest."""
    image_noise_samples: int = 4
    """Image-to-video families: noised copies of each conditioning frame to encode beside the clean one, each with
    pixel noise of sigma = exp(N(-3, 0.5)) as the official I2V trainer adds every step; training draws one per step.
    0: the clean frame only."""
    stage: str = ""
    """With an output URL: the local folder shards are written in before upload (default: one under the system
    temporary folder, named after the URL)."""
    layout: str = AUTO
    """Input layout: auto (found from the files) or a caption layout's name (the table in
    cogvx_dist/core/caption_layouts.py, which `cogvx prep --help` prints with each one's files)."""
    caption_file: str | None = None
    """CogVideo layout: the caption list's name in the dataset folder (default: prompts.txt or prompt.txt)."""
    video_file: str | None = None
    """CogVideo layout: the video list's name (default: videos.txt)."""
    image_file: str | None = None
    """CogVideo layout: the conditioning-image list's name (default: images.txt, when present)."""
    model_id: str | None = None
    """Name recorded in the manifest as the model (e.g. the hub id); defaults to `model`."""
    frames: int | list[int] | None = None
    """Pixel frames per sample, or several (frame buckets: a list, or "49,25"); each must be valid for the family
    (8N+1 / 16N+1). A clip goes to the longest frame bucket it fills at the target rate; one shorter than the
    shortest is refused. Default: the checkpoint's."""
    clips_per_video: int = 1
    """Up to this many clips from one video: non-overlapping windows of the clip length, spread evenly from the
    video's start to its end (the same ones on every run), each its own sample keyed KEY-w01, KEY-w02, ... 1: one
    clip from the start, keyed KEY (as before)."""
    buckets: list[tuple[int, int]] = field(default_factory=list)
    """Resolution buckets as (height, width); each clip goes to the bucket closest in aspect ratio. Default: the
    checkpoint's resolution. The first bucket is the manifest's height/width."""
    target_fps: float | None = None
    """Sample frames at this rate (source fps / target fps = stride). Default: the family's fps unless frame_stride."""
    frame_stride: int | None = None
    """Take every Nth source frame instead of resampling to target_fps (exclusive with target_fps)."""
    storage_dtype: str = "bfloat16"
    """dtype of the stored tensors: bfloat16, float16 or float32."""
    compute_dtype: str = "auto"
    """dtype the encoders run in: auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16."""
    device: str = "auto"
    """auto (this process's GPU, cuda:local_rank % count, else CPU), cpu, or cuda[:N]."""
    text_batch_size: int = 8
    """Prompts per T5 forward pass."""
    vae_batch_size: int = 1
    """Clips per VAE encode call (clips of one bucket only)."""
    vae_slicing: bool = True
    """Encode a VAE batch one clip at a time (diffusers enable_slicing): less memory for vae_batch_size > 1."""
    vae_tiling: bool = False
    """Encode in spatial tiles (diffusers enable_tiling): much less memory, slower, slightly different moments."""
    vae_channels_last: bool = False
    """Keep the VAE's convolution weights and input channels-last (NDHWC): cuDNN's bf16 3D convolutions avoid a
    layout conversion per layer on NVIDIA GPUs. Same moments up to rounding; measure with benchmarks/bench_prep.py."""
    vae_compile: bool = False
    """torch.compile the VAE encoder (fuses the norms and activations between convolutions). Each process compiles
    once per clip size (about a minute on a GPU), so it pays off on slices of many clips."""
    decode_workers: int = 2
    """Threads decoding videos ahead of the VAE (PyAV releases the GIL while decoding)."""
    text_chunk: int = 4096
    """Records per T5-then-VAE round: bounds the prompt embeddings held in memory; T5 reloads once per chunk."""
    shard_max_bytes: int = 512 << 20
    """Target shard size in bytes: a shard is closed once it reaches this size."""
    shard_max_samples: int = 1000
    """Most samples per shard."""
    max_failed_fraction: float = 0.1
    """The job exits non-zero when more than this fraction of all its inputs could not be used (checked by the
    process that merges the manifest, and by any process whose own failures alone pass it)."""
    rank: int | None = None
    """This process's rank (overrides MPI and environment discovery; needs world_size)."""
    world_size: int | None = None
    """Number of processes in the job (with rank, or with JOB_COMPLETION_INDEX on Kubernetes)."""
    progress: bool = True
    """Show a progress bar per process."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "prep config") -> PrepConfig:
        """Build from a mapping with the shared config loader (unknown keys and wrong types are rejected by name);
        `buckets` may be given as "HxW" strings, `frames` as "49,25" and `shard_max_bytes` as "512MiB"."""
        from cogvx_dist.core.config_files import from_dict

        values = dict(values)
        try:
            buckets = values.get("buckets")
            if isinstance(buckets, (list, tuple)):
                values["buckets"] = [parse_size(b, "buckets") for b in buckets]
            if isinstance(values.get("frames"), str):
                values["frames"] = parse_frame_counts([values["frames"]], "frames")
            if isinstance(values.get("shard_max_bytes"), str):
                values["shard_max_bytes"] = parse_bytes(values["shard_max_bytes"], "shard_max_bytes")
            return from_dict(cls, values)
        except CogvxError as err:
            raise CogvxError(f"{where}: {err}") from err

    @classmethod
    def from_yaml(cls, path: str | Path) -> PrepConfig:
        """Load a YAML or TOML file whose top-level keys are field names."""
        from cogvx_dist.core.config_files import read_config_file

        return cls.from_dict(read_config_file(path), where=str(path))

    def replace(self, **overrides: Any) -> PrepConfig:
        """A copy with the non-None overrides applied (CLI flags over YAML)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def template(self) -> str:
        """The prompt template in effect ({prompt} alone when none is given)."""
        return self.prompt_template or f"{self.prompt_prefix}{PROMPT_SLOT}"

    def frame_counts(self) -> list[int]:
        """The frame buckets given, longest first (empty: the checkpoint's default)."""
        if self.frames is None:
            return []
        counts = [self.frames] if isinstance(self.frames, int) else list(self.frames)
        return sorted(counts, reverse=True)

    def check_basic(self) -> None:
        """Checks that need no checkpoint; each error names the key."""
        for key in ("model", "data", "out"):
            if not getattr(self, key):
                raise CogvxError(f"{key} is required (--{key})")
        if self.out.startswith(("http://", "https://")):
            raise CogvxError(f"out {self.out}: http(s) URLs cannot be written; give a folder or an s3:// or gs:// URL")
        if self.prompt_prefix and self.prompt_template:
            raise CogvxError("prompt_prefix and prompt_template exclude each other: give one")
        if self.prompt_template and PROMPT_SLOT not in self.prompt_template:
            raise CogvxError(f"prompt_template {self.prompt_template!r} has no {PROMPT_SLOT} where the caption goes")
        if self.layout not in layout_choices():
            raise CogvxError(unknown_layout(self.layout))
        if self.storage_dtype not in DTYPE_NAMES:
            raise CogvxError(f"storage_dtype must be one of {', '.join(DTYPE_NAMES)}, not {self.storage_dtype!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise CogvxError(f"compute_dtype must be auto, float32 or bfloat16, not {self.compute_dtype!r}")
        if not (self.device in ("auto", "cpu") or re.match(r"^cuda(:\d+)?$", self.device)):
            raise CogvxError(f"device must be auto, cpu or cuda[:N], not {self.device!r}")
        if self.target_fps is not None and self.frame_stride is not None:
            raise CogvxError("target_fps and frame_stride exclude each other: give one")
        if self.target_fps is not None and self.target_fps <= 0:
            raise CogvxError(f"target_fps must be > 0, not {self.target_fps}")
        if self.frame_stride is not None and self.frame_stride < 1:
            raise CogvxError(f"frame_stride must be >= 1, not {self.frame_stride}")
        counts = [] if self.frames is None else [self.frames] if isinstance(self.frames, int) else list(self.frames)
        if isinstance(self.frames, list) and not counts:
            raise CogvxError("frames: an empty list; give one frame count or several, e.g. 49,25")
        for count in counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise CogvxError(f"frames must be whole numbers >= 1, not {count!r}")
        if len(set(counts)) != len(counts):
            raise CogvxError("frames: a frame count is listed twice")
        if self.clips_per_video < 1:
            raise CogvxError(f"clips_per_video must be >= 1 (1: one clip from each video's start), not "
                             f"{self.clips_per_video}")
        if self.image_noise_samples < 0:
            raise CogvxError(f"image_noise_samples must be >= 0 (0: none), not {self.image_noise_samples}")
        for key in ("text_batch_size", "vae_batch_size", "decode_workers", "text_chunk", "shard_max_bytes",
                    "shard_max_samples"):
            if getattr(self, key) <= 0:
                raise CogvxError(f"{key} must be > 0, not {getattr(self, key)}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise CogvxError(f"max_failed_fraction must be within [0, 1], not {self.max_failed_fraction}")
        for height, width in self.buckets:
            if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
                raise CogvxError(
                    f"buckets: {height}x{width} is not a positive multiple of {SIZE_MULTIPLE} in both sides "
                    "(8x VAE compression times the 2x2 patch)"
                )
        if len(set(self.buckets)) != len(self.buckets):
            raise CogvxError("buckets: a resolution is listed twice")
        if (self.rank is None) != (self.world_size is None) and self.rank is not None:
            raise CogvxError("rank needs world_size (--world-size)")
        if self.world_size is not None and self.world_size < 1:
            raise CogvxError(f"world_size must be >= 1, not {self.world_size}")
        if self.rank is not None and not 0 <= self.rank < (self.world_size or 0):
            raise CogvxError(f"rank must be within [0, world_size), not {self.rank} of {self.world_size}")

    def check_family(self, family: Any, default_frames: int, transformer_config: dict[str, Any] | None = None) -> int:
        """Checks against the model family (and, given the checkpoint's transformer config, each bucket against the
        largest size its rotary grid takes); returns the longest frame count (see frame_buckets)."""
        return self.frame_buckets(family, default_frames, transformer_config)[0]

    def frame_buckets(self, family: Any, default_frames: int,
                      transformer_config: dict[str, Any] | None = None) -> list[int]:
        """The frame counts to prep, longest first, each checked against the family (as check_family)."""
        counts = self.frame_counts() or [default_frames]
        for frames in counts:
            if not family.is_valid_frame_count(frames):
                valid = family.valid_frame_counts()
                raise CogvxError(
                    f"frames: {frames} is not valid for {family.name} (valid: {valid[0]}, {valid[1]}, ..., "
                    f"{valid[-1]}; {family.frame_multiple}N+1)"
                )
            if family.use_learned_positional_embeddings and frames != default_frames:
                raise CogvxError(f"frames: {family.name} learned its position embeddings for {default_frames} "
                                 f"frames, not {frames}")
        if transformer_config is not None:
            # Prep itself never runs the transformer: without this a bucket past CogVideoX 1.5's rotary grid is only
            # found when training starts. (Other sizes 5b-I2V's learned positions refuse stay allowed here, as before:
            # the training pre-flight refuses those shards.)
            for height, width in self.buckets:
                problem = family.position_grid_problem(height, width, transformer_config)
                if problem:
                    raise CogvxError(f"buckets: {problem}")
        return counts


def parse_frame_counts(values: list[Any], key: str = "--frames") -> list[int]:
    """Frame counts from repeated flags and/or comma lists ("49,25"), in the order given; a one-line error naming
    `key` for anything that is not a whole number."""
    counts = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part.isdigit():
                raise CogvxError(f"{key}: {value!r} is not a frame count or a comma list of them (e.g. 49 or 49,25)")
            counts.append(int(part))
    return counts
