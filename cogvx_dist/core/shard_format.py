"""The shard format: the contract between the prep tier and the train tier, in one place.

A dataset folder holds:
- `shard-rRRRRR-NNNNNN.tar`: complete WebDataset shards of prep rank R (brace-expressible:
  `shard-r{00000..00003}-{000000..000009}.tar`);
- `.shard-rRRRRR-NNNNNN.tar.tmp`: a shard being written; renamed only when complete;
- `parts/rank-RRRRR.json` and `parts/errors-rRRRRR.jsonl`: what prep rank R has finished and could not use;
- `index.safetensors`: every sample's key, digest and member offsets as arrays (core/sample_index.py);
- `empty_prompt.safetensors`: the T5 embedding of the empty prompt, once per dataset (caption dropout);
- `manifest.json` + `errors.jsonl`: the merge of all parts, written once every rank is complete (the index first,
  the manifest last: a folder with a manifest is complete).

The folder may be a URL prefix (`s3://bucket/data`, `https://host/data`; see core/storage.py): readers fetch the
manifest and the index whole and each sample with two ranged reads.

One sample in a shard is two tar members sharing a key:

- `KEY.latents.safetensors`: the tensors (VAE posterior moments of the video, the prompt's T5 embedding, and for
  image-to-video families the moments of the conditioning first frame, and of K noised copies of it with their
  noise levels when prepped with image_noise_samples K);
- `KEY.json`: what the sample is (prompt, source path, frames, size, fps).

Nothing in a shard is a pickle. Latent moments are stored exactly as the VAE returns them (unscaled); the trainer
applies the family's scaling factor once, after drawing a latent, and the manifest records that convention.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import ModelFamily
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.sample_index import INDEX_NAME, SampleIndex, member_row, tar_members
from cogvx_dist.core.storage import Store

FORMAT_NAME = "cogvx-latent-shards"
FORMAT_VERSION = 2
"""Version 2 moved per-sample keys and digests out of manifest.json into index.safetensors, with member offsets."""
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
PARTS_DIR = "parts"
SHARD_RE = re.compile(r"^shard-r(\d{5})-(\d{6})\.tar$")
CROP_WARN = 0.25
"""Prep warns when samples lose more than this fraction of their frame to the crop (Manifest.stats counts them)."""

EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
"""The dataset's empty-prompt embedding (one tensor, PROMPT_EMBEDS), what caption dropout trains with."""

TENSORS_EXT = "latents.safetensors"
META_EXT = "json"

LATENT_MEAN = "latent_mean"
"""[C, F_latent, H/8, W/8] posterior mean of the video latents (unscaled)."""
LATENT_LOGVAR = "latent_logvar"
"""[C, F_latent, H/8, W/8] posterior log-variance of the video latents."""
PROMPT_EMBEDS = "prompt_embeds"
"""[text_max_length, text_embed_dim] T5 last hidden state of the padded prompt."""
IMAGE_MEAN = "image_latent_mean"
"""[C, 1, H/8, W/8] posterior mean of the conditioning first frame (image-to-video families only)."""
IMAGE_LOGVAR = "image_latent_logvar"
"""[C, 1, H/8, W/8] posterior log-variance of the conditioning first frame (image-to-video families only)."""

NOISED_IMAGE_MEAN = "noised_image_latent_mean"
"""[K, C, 1, H/8, W/8] posterior means of K noised copies of the conditioning first frame (image-to-video datasets
prepped with image_noise_samples K > 0: the official I2V recipe's pixel-space noise, drawn at prep)."""
NOISED_IMAGE_LOGVAR = "noised_image_latent_logvar"
"""[K, C, 1, H/8, W/8] posterior log-variances of the same."""
IMAGE_NOISE_SIGMAS = "image_noise_sigmas"
"""[K] float32: the pixel-space noise level of each noised copy (on images in [-1, 1])."""
IMAGE_NOISE_LOG_SIGMA = (-3.0, 0.5)
"""(mean, std) of log sigma: the official CogVideoX I2V trainer noises the conditioning image (in [-1, 1]) with
sigma = exp(N(-3, 0.5)) before encoding it; prep draws the K sigmas so."""

VIDEO_TENSORS = (LATENT_MEAN, LATENT_LOGVAR, PROMPT_EMBEDS)
IMAGE_TENSORS = (IMAGE_MEAN, IMAGE_LOGVAR)
NOISED_IMAGE_TENSORS = (NOISED_IMAGE_MEAN, NOISED_IMAGE_LOGVAR)
TRAINING_TENSORS = VIDEO_TENSORS + IMAGE_TENSORS + NOISED_IMAGE_TENSORS
"""Everything a training step may read from a sample (micro-batches stack those a sample has)."""


def tensor_names(image_to_video: bool, image_noise_samples: int = 0) -> tuple[str, ...]:
    """The tensors every sample of a dataset holds: the image moments only for image-to-video families, the noised
    copies (and their sigmas) only when prepped with image_noise_samples."""
    if not image_to_video:
        return VIDEO_TENSORS
    noised = NOISED_IMAGE_TENSORS + (IMAGE_NOISE_SIGMAS,) if image_noise_samples else ()
    return VIDEO_TENSORS + IMAGE_TENSORS + noised


LATENT_SCALING = "scale-after-sampling"
"""Recorded in the manifest: moments are unscaled; the trainer multiplies a drawn latent by the VAE scaling factor
(and, for invert_scale_latents I2V families, divides image latents by it), exactly once."""


def shard_name(rank: int, index: int) -> str:
    """Final file name of a prep rank's index-th shard."""
    return f"shard-r{rank:05d}-{index:06d}.tar"


def temporary_shard_name(rank: int, index: int) -> str:
    """The name a shard has while it is written."""
    return f".{shard_name(rank, index)}.tmp"


def part_path(out: str | Path, rank: int) -> Path:
    """Progress file of a prep rank."""
    return Path(out) / PARTS_DIR / f"rank-{rank:05d}.json"


def rank_errors_path(out: str | Path, rank: int) -> Path:
    """Errors file of a prep rank."""
    return Path(out) / PARTS_DIR / f"errors-r{rank:05d}.jsonl"


def sample_key(source: str) -> str:
    """Stable WebDataset key of a sample, derived from its source path (no dots, as WebDataset requires)."""
    return hashlib.sha1(source.encode()).hexdigest()[:20]


WINDOW_KEY_RE = re.compile(r"^(.*)-w(\d{2,})$")
"""A key of one of several clips from one video (prep's clips_per_video): the video's key, -w, the clip's number."""


def window_key(key: str, window: int) -> str:
    """The key of a video's window-th clip (0-based) when prep takes several: KEY-w01, KEY-w02, ..."""
    return f"{key}-w{window + 1:02d}"


def video_key(key: str) -> str:
    """The key of the video a sample came from: its own key, less a window suffix (window_key)."""
    match = WINDOW_KEY_RE.match(key)
    return match.group(1) if match else key


def encode_sample(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """A sample as the dict `webdataset.TarWriter.write` takes: bytes members under their extensions."""
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return {
        "__key__": key,
        TENSORS_EXT: save_safetensors_bytes(contiguous),
        META_EXT: json.dumps(meta, sort_keys=True).encode(),
    }


def sample_digest(sample: dict[str, Any]) -> str:
    """SHA-256 of a sample's members (tensors, then metadata) as stored: what `data.verify: sha256` checks."""
    digest = hashlib.sha256(sample[TENSORS_EXT])
    digest.update(sample[META_EXT])
    return digest.hexdigest()


def write_empty_prompt(folder: str | Path, embedding: torch.Tensor) -> Path:
    """Save the dataset's empty-prompt embedding ([text_max_length, text_embed_dim])."""
    return write_atomic(Path(folder) / EMPTY_PROMPT_NAME,
                        save_safetensors_bytes({PROMPT_EMBEDS: embedding.detach().to("cpu").contiguous()}))


def read_empty_prompt(store: Store) -> torch.Tensor:
    """The dataset's empty-prompt embedding; a one-line error when the dataset has none."""
    try:
        data = store.read(EMPTY_PROMPT_NAME)
    except CogvxError as err:
        raise CogvxError(f"{err}: the dataset has no empty-prompt embedding (prep writes it since caption dropout "
                         f"exists; run `cogvx prep` on the same --out again to add it)") from err
    return load_safetensors_bytes(data)[PROMPT_EMBEDS]


def member_rows(shard: str | Path, keys: list[str]) -> list[list[int]]:
    """ShardEntry.members of a written shard file: where each sample's two members sit, from its tar headers."""
    members = tar_members(str(shard))
    return [member_row(members, key, TENSORS_EXT, META_EXT) for key in keys]


def decode_sample(sample: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a sample read from a shard (raw bytes members, never unpickled)."""
    try:
        tensors = load_safetensors_bytes(sample[TENSORS_EXT])
        meta = json.loads(sample[META_EXT])
    except KeyError as err:
        raise CogvxError(f"sample {sample.get('__key__', '?')} lacks its {err.args[0]} member") from err
    return tensors, meta


@dataclass
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    """File name relative to the dataset folder."""
    samples: int
    """Number of samples in the shard."""
    bytes: int
    """File size."""
    sha256: str
    """Checksum of the whole file."""
    keys: list[str] = field(default_factory=list)
    """Sample keys in file order (lets readers address a sample by global index)."""
    digests: list[str] = field(default_factory=list)
    """sample_digest of each sample, in key order (empty in manifests written before digests were recorded)."""
    members: list[list[int]] = field(default_factory=list)
    """[tensors offset, tensors bytes, meta offset, meta bytes] of each sample, in key order (sample_index)."""

    PER_SAMPLE = ("keys", "digests", "members")
    """Lists kept in progress files and the index, not in a version 2 manifest."""


@dataclass
class Manifest:
    """manifest.json: what the shards hold and how they were made."""

    family: str
    """Model family whose VAE and text encoder made the shards."""
    model: str
    """Checkpoint (folder or hub id) that made them."""
    vae_scaling_factor: float
    """Scaling factor of that VAE."""
    invert_scale_latents: bool
    """The VAE's invert_scale_latents flag (CogVideoX 1.5)."""
    latent_channels: int
    """Channels of the VAE latents."""
    frames: int
    """Pixel frames per sample."""
    height: int
    """Pixel height per sample."""
    width: int
    """Pixel width per sample."""
    latent_frames: int
    """Latent frames per sample ((frames - 1) / 4 + 1)."""
    fps: float
    """Frame rate the clips were sampled at."""
    text_max_length: int
    """T5 tokens per prompt."""
    text_embed_dim: int
    """Width of the prompt embedding."""
    dtypes: dict[str, str]
    """Storage dtype per tensor name."""
    shards: list[ShardEntry] = field(default_factory=list)
    """Every complete shard."""
    skipped: int = 0
    """Inputs that could not be used (reasons in errors.jsonl)."""
    image_to_video: bool = False
    """Samples carry conditioning first-frame moments."""
    latent_scaling: str = LATENT_SCALING
    """How latent scaling is applied (see LATENT_SCALING)."""
    format: str = FORMAT_NAME
    """Format name."""
    format_version: int = FORMAT_VERSION
    """Format version; readers refuse other versions."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (prep settings, timings)."""
    buckets: list[list[int]] = field(default_factory=list)
    """Every [height, width] a sample may have (resolution buckets; each sample's JSON says its own). Empty means
    [[height, width]] only. height/width above are the first bucket."""
    prompt_template: str = "{prompt}"
    """What T5 encoded for each caption ({prompt} is the caption; a trigger word or style text around it)."""
    index: dict[str, Any] = field(default_factory=dict)
    """name, bytes and sha256 of the sample index file (version 2; version 1 manifests list keys per shard)."""
    image_noise_samples: int = 0
    """Image-to-video datasets: noised copies of the conditioning frame per sample (NOISED_IMAGE_MEAN); 0: none."""
    frame_counts: list[int] = field(default_factory=list)
    """Every pixel frame count a sample may have (each sample's JSON says its own), longest first: the frame buckets
    (prep's frames given several), then 1 when the dataset holds single images beside its clips; empty means
    [frames] only. `frames` above is the longest."""
    clips_per_video: int = 1
    """Most clips prep took from one video (non-overlapping windows, keyed KEY-w01, ...; see window_key); 1: one
    clip from each video's start, keyed by the video alone."""
    stats: dict[str, Any] = field(default_factory=dict)
    """What the samples hold, counted by prep from each sample's JSON (empty in manifests written before prep counted
    them): {"samples", "seconds", "crop_fraction", "cropped_over_quarter", "buckets": [...]}: samples counted (all
    of them unless a shard of an older prep could not be read), their total duration in seconds (frames / fps; 0 for
    single images), the mean fraction of each source frame cut off by the crop to its bucket, how many lost more
    than CROP_WARN of it, and the same per bucket: {"frames", "height", "width", "samples", "seconds",
    "crop_fraction", "cropped_over_quarter"}, one per frame count x resolution the manifest lists (frame_counts x
    sizes, in that order; empty buckets too). See bucket_samples."""

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        return sum(s.samples for s in self.shards)

    def sizes(self) -> list[tuple[int, int]]:
        """Every (height, width) a sample may have: the buckets, or just (height, width)."""
        return [tuple(b) for b in self.buckets] or [(self.height, self.width)]

    def all_frame_counts(self) -> list[int]:
        """Every pixel frame count a sample may have: the clips' and, with single images, 1."""
        return list(self.frame_counts) or [self.frames]

    def bucket_samples(self) -> dict[tuple[int, int, int], int] | None:
        """(frames, height, width) -> samples prep wrote of it, from `stats` without opening a shard; None when the
        manifest has no counts (written before prep counted) or they miss samples."""
        if not self.stats or self.stats.get("samples") != self.num_samples:
            return None
        return {(b["frames"], b["height"], b["width"]): b["samples"] for b in self.stats.get("buckets", [])}

    def expected_shapes(self, height: int, width: int, frames: int | None = None) -> dict[str, tuple[int, ...]]:
        """Tensor shapes a sample of the given bucket (and frame count: the clips' by default) must have."""
        from cogvx_dist.core.families import get_family

        family = get_family(self.family)
        latent_size = family.latent_size(height, width)
        latent_frames = self.latent_frames if frames is None else family.latent_frames(frames)
        shapes = {
            LATENT_MEAN: (self.latent_channels, latent_frames, *latent_size),
            LATENT_LOGVAR: (self.latent_channels, latent_frames, *latent_size),
            PROMPT_EMBEDS: (self.text_max_length, self.text_embed_dim),
        }
        if self.image_to_video:
            shapes[IMAGE_MEAN] = shapes[IMAGE_LOGVAR] = (self.latent_channels, 1, *latent_size)
        if self.image_to_video and self.image_noise_samples:
            count = self.image_noise_samples
            shapes[NOISED_IMAGE_MEAN] = shapes[NOISED_IMAGE_LOGVAR] = (count, self.latent_channels, 1, *latent_size)
            shapes[IMAGE_NOISE_SIGMAS] = (count,)
        return shapes

    def to_json(self) -> str:
        """Serialised manifest (shards without their per-sample lists, which the index holds)."""
        data = asdict(self)
        for shard in data["shards"]:
            for name in ShardEntry.PER_SAMPLE:
                shard.pop(name)
        data["num_samples"] = self.num_samples
        return json.dumps(data, indent=2) + "\n"

    def write(self, folder: str | Path) -> Path:
        """Write index.safetensors from the shards' per-sample lists, then manifest.json, atomically into `folder`.
        """
        if all(len(shard.keys) == shard.samples for shard in self.shards):
            index = SampleIndex.from_entries(self.shards).to_bytes()
            write_atomic(Path(folder) / INDEX_NAME, index)
            self.index = {"name": INDEX_NAME, "bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()}
        elif not self.index:
            raise CogvxError(f"{folder}: a manifest without per-sample keys and without an index cannot be written")
        # else: a manifest read back from a folder, whose index file stays as it is
        self.format_version = FORMAT_VERSION
        return write_atomic(Path(folder) / MANIFEST_NAME, self.to_json())

    @classmethod
    def read(cls, folder: str | Path, store: Store | None = None) -> Manifest:
        """Read and validate `folder/manifest.json` (a local folder, a manifest path or a URL prefix)."""
        if store is None and not str(folder).endswith(".json"):
            store = Store(folder)
        if store is None or not store.remote:
            path = Path(folder)
            if path.is_dir():
                path = path / MANIFEST_NAME
            if not path.is_file():
                raise CogvxError(f"no shard manifest at {path} (run `cogvx prep` first)")
            return cls.parse(path.read_text(), where=str(path))
        try:
            text = store.read(MANIFEST_NAME).decode()
        except CogvxError as err:
            raise CogvxError(f"no shard manifest: {err}") from err
        return cls.parse(text, where=store.url(MANIFEST_NAME))

    def sample_index(self, store: Store) -> SampleIndex:
        """Every sample's key, digest and member offsets: the index file (version 2) or the shards' lists."""
        if not self.index:
            return SampleIndex.from_entries(self.shards)
        where = store.url(self.index["name"])
        data = store.read(self.index["name"])
        if len(data) != self.index["bytes"] or hashlib.sha256(data).hexdigest() != self.index["sha256"]:
            raise CogvxError(f"{where}: {len(data)} bytes that do not match the manifest's size and sha256 "
                             "(damaged or from another prep run)")
        return SampleIndex.from_bytes(data, where, self.num_samples, len(self.shards))

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        """Validate manifest JSON text; `where` names its origin in error messages."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CogvxError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CogvxError(f"{where}: not a cogvx shard manifest (format {found!r})")
        if data.get("format_version") not in READABLE_VERSIONS:
            raise CogvxError(f"{where}: shard format version {data.get('format_version')} but this cogvx reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        if data["format_version"] >= 2 and not data.get("index"):
            raise CogvxError(f"{where}: a version 2 manifest without its sample index entry")
        data.pop("num_samples", None)
        try:
            data["shards"] = [ShardEntry(**s) for s in data.get("shards", [])]
        except TypeError as err:
            raise CogvxError(f"{where}: malformed shard entry ({err})") from err
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CogvxError(f"{where}: unknown manifest keys {unknown}")
        try:
            return cls(**data)
        except TypeError as err:
            raise CogvxError(f"{where}: incomplete manifest ({err})") from err


def manifest_header(family: ModelFamily, model: str, *, vae_scaling_factor: float, latent_channels: int,
                    text_embed_dim: int, frames: int, buckets: list[tuple[int, int]], fps: float,
                    storage_dtype: str, prompt_template: str = "{prompt}",
                    image_noise_samples: int = 0, single_images: bool = False,
                    frame_counts: list[int] | None = None, clips_per_video: int = 1) -> dict[str, Any]:
    """The manifest fields every writer of a dataset must agree on (all but shards, skipped, stats and extra).
    `frame_counts`: several frame buckets (`frames` is then the longest); `clips_per_video` is recorded only above
    1, so that the header of a dataset prepped without either is what it always was."""
    noised = image_noise_samples if family.image_to_video else 0
    dtypes = {name: storage_dtype for name in tensor_names(family.image_to_video, noised)}
    if noised:
        dtypes[IMAGE_NOISE_SIGMAS] = "float32"
    counts = sorted(set(frame_counts or [frames]), reverse=True)
    if len(counts) > 1:
        frames = counts[0]
    header = {
        "family": family.name,
        "model": model,
        "vae_scaling_factor": vae_scaling_factor,
        "invert_scale_latents": bool(family.invert_scale_latents),
        "latent_channels": latent_channels,
        "frames": frames,
        "height": buckets[0][0],
        "width": buckets[0][1],
        "latent_frames": family.latent_frames(frames),
        "fps": float(fps),
        "text_max_length": family.text_max_length,
        "text_embed_dim": text_embed_dim,
        "dtypes": dtypes,
        "image_to_video": family.image_to_video,
        "latent_scaling": LATENT_SCALING,
        "buckets": [list(b) for b in buckets],
        "prompt_template": prompt_template,
        "image_noise_samples": noised,
        "frame_counts": counts + [1] if single_images else counts if len(counts) > 1 else [],
    }
    if clips_per_video > 1:
        header["clips_per_video"] = clips_per_video
    return header


def read_part(out: str | Path, rank: int) -> dict[str, Any] | None:
    """A prep rank's progress file (header, settings, shards with keys, counts, stats), or None."""
    path = part_path(out, rank)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CogvxError(f"{path}: not valid JSON ({err.msg}); delete it to redo rank {rank}") from err
    data["shards"] = [ShardEntry(**s) for s in data.get("shards", [])]
    return data


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
