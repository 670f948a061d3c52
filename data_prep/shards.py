"""Shard writing (temporary name, then rename), per-rank progress files, resume, the final manifest merge, and the
inspect/verify checks. The folder layout is the shard format's (cogvx_dist/core/shard_format.py): a rank's
progress file is rewritten atomically after every shard and marked complete at the end of the rank's slice; the
rank's temporary shards and temporary progress files are deleted on resume. Beside each shard a rank's progress
file keeps the shard's summary (samples, seconds and crop per bucket, from the samples' JSON), which the merge adds
up into the manifest's stats.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch

from cogvx_dist.core import shard_format
from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.files import describe_io_error, write_atomic
from cogvx_dist.core.shard_format import (
    PARTS_DIR,
    SHARD_RE,
    Manifest,
    ShardEntry,
    part_path,
    read_part,
    shard_name,
    temporary_shard_name,
)
from cogvx_dist.core.storage import Store

Summary = dict[str, list[float]]
"""A shard's samples by bucket: "FRAMESxHEIGHTxWIDTH" -> [samples, seconds, sum of crop fractions, samples cropped
by more than CROP_WARN] (JSON in the progress files' `summaries`, by shard name)."""


def sample_summary(meta: dict[str, Any]) -> tuple[str, float, float]:
    """(bucket, seconds, crop fraction) of one sample from its JSON: every prep has recorded frames, fps, size and
    source_size, so older shards are counted the same way."""
    from data_prep.decode import crop_fraction

    frames, height, width = int(meta.get("frames", 0)), int(meta.get("height", 0)), int(meta.get("width", 0))
    fps = float(meta.get("fps") or 0)
    source = meta.get("source_size")
    crop = crop_fraction(source, (height, width)) if source and height and width else 0.0
    return f"{frames}x{height}x{width}", frames / fps if fps > 0 else 0.0, crop


def add_to_summary(summary: Summary, meta: dict[str, Any]) -> None:
    """Count one sample into a shard's summary."""
    bucket, seconds, crop = sample_summary(meta)
    row = summary.setdefault(bucket, [0, 0.0, 0.0, 0])
    row[0] += 1
    row[1] += seconds
    row[2] += crop
    row[3] += crop > shard_format.CROP_WARN


def shard_summary(path: Path) -> Summary:
    """The summary of a shard file, from its samples' JSON members (for shards whose rank recorded none)."""
    summary: Summary = {}
    for sample in _tar_samples(path, only=shard_format.META_EXT):
        add_to_summary(summary, json.loads(sample[shard_format.META_EXT]))
    return summary


class ShardWriter:
    """Writes one rank's samples into shards of bounded size; each shard appears under its final name only whole."""

    def __init__(self, out: Path, rank: int, next_index: int, max_bytes: int, max_samples: int,
                 on_shard: Callable[[ShardEntry, Summary], None]):
        self.out = Path(out)
        self.rank = rank
        self.index = next_index
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.on_shard = on_shard
        self._handle: Any = None
        self._tar: Any = None
        self._keys: list[str] = []
        self._digests: list[str] = []
        self._summary: Summary = {}
        self.bytes_written = 0
        self.shards_written = 0

    @property
    def _tmp(self) -> Path:
        return self.out / temporary_shard_name(self.rank, self.index)

    def write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Append one sample; closes the shard once it reaches the size or sample limit. A failed write (a full disk)
        deletes the open shard's temporary file and is a one-line CogvxError naming the shard and the space left."""
        import webdataset as wds

        sample = shard_format.encode_sample(key, tensors, meta)
        try:
            if self._tar is None:
                self._handle = open(self._tmp, "wb")
                # encoder=False: members are written as the bytes we give (never pickled); fixed mtime makes shards
                # of the same samples byte-identical.
                self._tar = wds.TarWriter(self._handle, encoder=False, mtime=0)
                self._keys, self._digests, self._summary = [], [], {}
            self._tar.write(sample)
            full = self._handle.tell() >= self.max_bytes
        except OSError as err:
            self._abandon(err)
        self._keys.append(key)
        self._digests.append(shard_format.sample_digest(sample))
        add_to_summary(self._summary, meta)
        if full or len(self._keys) >= self.max_samples:
            self.close()

    def flush(self) -> None:
        """Push buffered bytes of the open shard to its temporary file (it stays temporary until closed)."""
        if self._handle is not None:
            try:
                self._handle.flush()
            except OSError as err:
                self._abandon(err)

    def close(self) -> None:
        """Finish the open shard: close, fsync, rename to the final name, report its entry."""
        if self._tar is None:
            return
        final = self.out / shard_name(self.rank, self.index)
        try:
            self._tar.close()
            self._handle.flush()
            os.fsync(self._handle.fileno())  # a network filesystem may report a full disk only here
            self._handle.close()
            self._tmp.replace(final)
        except OSError as err:
            self._abandon(err)
        entry = ShardEntry(final.name, len(self._keys), final.stat().st_size, shard_format.file_sha256(final),
                           self._keys, self._digests, shard_format.member_rows(final, self._keys))
        self._tar = self._handle = None
        self.index += 1
        self.bytes_written += entry.bytes
        self.shards_written += 1
        self.on_shard(entry, self._summary)

    def _abandon(self, err: OSError) -> NoReturn:
        """After a failed write: drop the open shard (its samples are encoded again by a rerun) and its temporary
        file, so that a full disk is not left fuller, then raise the failure as one line naming the shard."""
        final = self.out / shard_name(self.rank, self.index)
        # Closing flushes what is buffered, which fails again on a full disk. The tar stream is closed first even so:
        # that marks it closed, else its finalizer writes to the closed file later and prints a traceback.
        for closable in (self._tar, self._handle):
            with contextlib.suppress(OSError, ValueError):
                if closable is not None:
                    closable.close()
        self._tmp.unlink(missing_ok=True)
        self._tar = self._handle = None
        self._keys, self._digests = [], []
        raise CogvxError(describe_io_error(err, final)) from err


def shard_entry(path: Path) -> ShardEntry:
    """The manifest entry of a complete shard file, read back from its samples (keys and digests)."""
    samples = list(_tar_samples(path))
    keys = [s["__key__"] for s in samples]
    digests = [shard_format.sample_digest(s) for s in samples]
    return ShardEntry(path.name, len(keys), path.stat().st_size, shard_format.file_sha256(path), keys, digests,
                      shard_format.member_rows(path, keys))


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write in the block (a full disk, a read-only folder) becomes a one-line CogvxError naming `path` and
    the space left there; write_atomic has already deleted its temporary file."""
    try:
        yield
    except OSError as err:
        raise CogvxError(describe_io_error(err, path)) from err


def write_part(out: Path, part: dict[str, Any]) -> None:
    """Save a rank's progress file atomically."""
    data = {**part, "shards": [asdict(s) for s in part["shards"]]}
    path = part_path(out, part["rank"])
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1) + "\n")


def all_parts(out: Path) -> dict[int, dict[str, Any]]:
    """Every rank's progress file in the folder, by rank."""
    parts = {}
    for path in sorted((Path(out) / PARTS_DIR).glob("rank-*.json")):
        rank = int(path.stem.split("-")[1])
        part = read_part(out, rank)
        if part is not None:
            parts[rank] = part
    return parts


def recover_rank_shards(out: Path, rank: int, listed: list[ShardEntry],
                        published: dict[str, int] | None = None) -> list[ShardEntry]:
    """The complete shards of a rank at start-up: those its progress file lists and still exist, plus finished
    shards it renamed but did not yet record (a crash between rename and progress write). The rank's leftover
    temporary files are deleted (remove_temporaries): the samples of a temporary shard are encoded again, and so are
    those of a listed shard that is gone. A listed shard that is there but not as the rank wrote it (another size,
    another sha256: a member appended by `tar --append`, an edit) is a CogvxError naming it: its entry would be
    false, and deleting what someone changed on purpose is not prep's call. Each local shard is read once for its
    sha256 (about a second a GB). With an output URL, `published` (the store's shards and sizes) says what exists,
    and sizes are what is compared; a shard uploaded but not yet recorded is encoded again."""
    out = Path(out)
    remove_temporaries(out, rank)
    present = _local_shards(out) if published is None else published
    kept = [entry for entry in listed if entry.name in present]
    for entry in kept:
        _check_unchanged(out, rank, entry, present[entry.name], hash_it=published is None)
    known = {e.name for e in kept}
    for path in sorted(out.glob(f"shard-r{rank:05d}-*.tar")):
        if path.name in known:
            continue
        try:
            kept.append(shard_entry(path))
        except (tarfile.TarError, OSError, KeyError):
            path.unlink()  # cannot happen through rename, but never keep an unreadable shard
    return sorted(kept, key=lambda e: e.name)


def _check_unchanged(out: Path, rank: int, entry: ShardEntry, size: int, hash_it: bool) -> None:
    """CogvxError naming the shard when its size (and, with `hash_it`, its sha256) is not what `rank` recorded."""
    path = out / entry.name
    sha256 = shard_format.file_sha256(path) if hash_it else None
    if size == entry.bytes and sha256 in (None, entry.sha256):
        return
    now = f"{size} bytes" + (f", sha256 {sha256[:16]}" if sha256 else "")
    then = f"{entry.bytes} bytes" + (f", sha256 {entry.sha256[:16]}" if sha256 else "")
    raise CogvxError(f"{path}: {now}, but rank {rank} recorded {then}: it changed after prep wrote it; restore it, "
                     f"or delete it and rerun prep, which encodes its {entry.samples} samples again")


def remove_temporaries(out: Path, rank: int) -> None:
    """Delete what a killed run of this rank left half-written: its temporary shards and the temporary files of its
    progress file (write_atomic's `.rank-RRRRR.json.XXXXXXXX.tmp`). Only this rank's: another rank may be writing its
    own right now, and each name holds its writer's rank."""
    for tmp in out.glob(f".shard-r{rank:05d}-*.tar.tmp"):
        tmp.unlink(missing_ok=True)
    progress = part_path(out, rank)
    mine = re.compile(rf"\.{re.escape(progress.name)}\.\w+\.tmp")  # the prefix and suffix write_atomic gives
    if progress.parent.is_dir():
        for tmp in progress.parent.iterdir():
            if mine.fullmatch(tmp.name):
                tmp.unlink(missing_ok=True)


def _local_shards(out: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in out.glob("shard-*.tar")}


def next_shard_index(out: Path, rank: int, shards: list[ShardEntry]) -> int:
    """One past the highest shard index this rank has used."""
    indices = [int(SHARD_RE.match(e.name).group(2)) for e in shards if SHARD_RE.match(e.name)]
    return max(indices, default=-1) + 1


def read_errors(path: Path) -> list[dict[str, Any]]:
    """Lines of an errors file (a torn last line from a crash is ignored)."""
    if not path.is_file():
        return []
    items = []
    for line in path.read_text().splitlines():
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return items


def parts_status(out: Path) -> tuple[int | None, list[int], dict[int, dict[str, Any]]]:
    """(world size of the latest run, ranks not yet complete, parts)."""
    parts = all_parts(out)
    if not parts:
        return None, [], parts
    world = parts[0]["world_size"] if 0 in parts else max(p["world_size"] for p in parts.values())
    missing = [r for r in range(world) if r not in parts or not parts[r].get("complete")]
    return world, missing, parts


def finalize(out: str | Path, published: dict[str, int] | None = None) -> tuple[Manifest, int]:
    """Merge every rank's progress into index.safetensors, manifest.json and errors.jsonl; returns (manifest,
    inputs in the job). With an output URL, `published` lists the shards the store holds.

    Raises CogvxError when a rank has not finished (so the manifest is never written from part of a job).
    """
    out = Path(out)
    world, missing, parts = parts_status(out)
    if world is None:
        raise CogvxError(f"{out}: no prep progress files in {PARTS_DIR}/ (run `cogvx prep` first)")
    if missing:
        raise CogvxError(f"{out}: rank(s) {', '.join(map(str, missing))} of {world} have not finished; run them first")
    header = parts[0]["header"]
    for rank in range(world):
        other = parts[rank]["header"]
        if other != header:
            diff = sorted(k for k in set(header) | set(other) if header.get(k) != other.get(k))
            raise CogvxError(f"{out}: rank {rank} encoded with different settings ({', '.join(diff)})")
    shards: list[ShardEntry] = []
    writer: dict[str, int] = {}
    for rank, part in parts.items():  # ranks of an earlier run with a larger world keep their finished shards
        shards.extend(part["shards"])
        writer.update((entry.name, rank) for entry in part["shards"])
    shards.sort(key=lambda e: e.name)
    seen: set[str] = set()
    present = _local_shards(out) if published is None else published
    for entry in shards:
        if entry.name not in present:
            raise CogvxError(f"{out}: shard {entry.name} is listed by rank progress but missing on disk")
        if present[entry.name] != entry.bytes:  # the manifest never records a size that is not the file's
            raise CogvxError(_changed_since_recorded(out, entry, present[entry.name], writer[entry.name]))
        dup = seen.intersection(entry.keys)
        if dup:
            raise CogvxError(f"{out}: sample {sorted(dup)[0]} appears in more than one shard")
        seen.update(entry.keys)
    errors: dict[str, dict[str, Any]] = {}
    videos = {shard_format.video_key(key) for key in seen}
    for path in sorted((out / PARTS_DIR).glob("errors-r*.jsonl")):
        for item in read_errors(path):
            if shard_format.sample_key(item["source"]) not in videos:
                errors[item["source"]] = item
    inputs = sum(parts[r].get("inputs", 0) for r in range(world))
    stats_keys = ("encoded", "failed", "truncated_prompts", "seconds", "decode_s", "decode_wait_s", "t5_s", "vae_s",
                  "write_s")
    totals = {k: round(sum(parts[r].get("stats", {}).get(k, 0) for r in range(world)), 3) for k in stats_keys}
    summaries = {name: summary for part in parts.values() for name, summary in part.get("summaries", {}).items()}
    manifest = Manifest(
        **header,
        shards=shards,
        skipped=len(errors),
        extra={"inputs": inputs, "ranks": world, "totals_last_run": totals, "prep": parts[0].get("settings", {})},
    )
    manifest.stats = dataset_stats(manifest, [summaries.get(e.name) or _summary_of(out, e) for e in shards])
    with writing(out / shard_format.ERRORS_NAME):
        write_atomic(out / shard_format.ERRORS_NAME,
                     "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors.values()))
    with writing(out / shard_format.MANIFEST_NAME):  # the index, then the manifest
        manifest.write(out)
    return manifest, inputs


def _summary_of(out: Path, entry: ShardEntry) -> Summary | None:
    """The summary of a shard its rank recorded none for (a prep before summaries were kept): read from the shard
    where it is local; None (not counted) where it is not, or unreadable."""
    path = out / entry.name
    if entry.samples and not path.is_file():
        return None
    try:
        return shard_summary(path) if entry.samples else {}
    except (tarfile.TarError, OSError, ValueError):
        return None


def dataset_stats(manifest: Manifest, summaries: list[Summary | None]) -> dict[str, Any]:
    """Manifest.stats from the shards' summaries (None: a shard not counted)."""
    rows: dict[str, list[float]] = {}
    for summary in summaries:
        for bucket, row in (summary or {}).items():
            total = rows.setdefault(bucket, [0, 0.0, 0.0, 0])
            for i, value in enumerate(row):
                total[i] += value
    names = [f"{f}x{h}x{w}" for f in manifest.all_frame_counts() for h, w in manifest.sizes()]
    names += sorted(set(rows) - set(names))  # never expected; counted rather than lost

    def entry(row: list[float]) -> dict[str, Any]:
        samples = int(row[0])
        return {"samples": samples, "seconds": round(row[1], 3),
                "crop_fraction": round(row[2] / samples, 4) if samples else 0.0,
                "cropped_over_quarter": int(row[3])}

    buckets = []
    for name in names:
        frames, height, width = map(int, name.split("x"))
        buckets.append({"frames": frames, "height": height, "width": width, **entry(rows.get(name, [0, 0, 0, 0]))})
    totals = [sum(row[i] for row in rows.values()) for i in range(4)]
    return {**entry(totals), "buckets": buckets}


def crop_line(manifest: Manifest) -> str | None:
    """The merge's one warning when samples lost more than CROP_WARN of their frame to the crop, or None."""
    stats = manifest.stats
    over = stats.get("cropped_over_quarter", 0)
    if not over:
        return None
    worst = max(stats["buckets"], key=lambda b: b["cropped_over_quarter"])
    return (f"{over} of {stats['samples']} samples lost more than {shard_format.CROP_WARN:.0%} of their frame to "
            f"cropping (mean {stats['crop_fraction']:.0%} over all; most in the {_bucket_name(worst)} bucket)"
            ": add a resolution bucket of their shape (--resolution HxW); `cogvx shards inspect` lists them")


def _changed_since_recorded(out: Path, entry: ShardEntry, size: int, rank: int) -> str:
    """Why the merge refuses a shard whose size is not what its rank recorded: it changed after it was recorded (a
    rank checks only its own shards at start-up, so the merge sees another rank's)."""
    return (f"{out}: {entry.name} is {size} bytes, but rank {rank} recorded {entry.bytes}: it changed after prep "
            f"wrote it; restore it, or delete it and rerun rank {rank}, which encodes its {entry.samples} samples "
            "again")


def inspect_text(out: str | Path) -> str:
    """A human summary of a shard folder's manifest."""
    manifest = Manifest.read(out)
    total_bytes = sum(s.bytes for s in manifest.shards)
    buckets = manifest.sizes()
    lines = [
        f"{out}: {manifest.format} v{manifest.format_version}",
        f"model        {manifest.model} ({manifest.family}{', image-to-video' if manifest.image_to_video else ''})",
        f"samples      {manifest.num_samples} in {len(manifest.shards)} shards, {_human(total_bytes)}",
        f"skipped      {manifest.skipped} (see {shard_format.ERRORS_NAME})",
        f"video        {' or '.join(map(str, manifest.all_frame_counts()))} frames, {manifest.height}x"
        f"{manifest.width}, {manifest.fps:g} fps; buckets " + ", ".join(f"{h}x{w}" for h, w in buckets),
        f"latents      {manifest.latent_channels} channels, {manifest.latent_frames} frames; scaling factor "
        f"{manifest.vae_scaling_factor:g} ({manifest.latent_scaling}, invert_scale_latents="
        f"{manifest.invert_scale_latents})",
        f"text         {manifest.text_max_length} tokens x {manifest.text_embed_dim}",
        "dtypes       " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.dtypes.items())),
    ]
    if manifest.clips_per_video > 1:
        lines.append(f"clips        up to {manifest.clips_per_video} a video (keys KEY-w01, KEY-w02, ...)")
    lines.extend(_stats_lines(manifest))
    if manifest.shards:
        first, last = manifest.shards[0].name, manifest.shards[-1].name
        lines.append(f"shards       {first} .. {last}")
    return "\n".join(lines)


def _stats_lines(manifest: Manifest) -> list[str]:
    """inspect's lines on what the samples hold, from the manifest's stats alone (no shard is opened)."""
    stats = manifest.stats
    if not stats:
        return ["contents     not recorded (prepped before cogvx counted samples per bucket; `cogvx prep finalize "
                "DIR` on a local folder counts them)"]
    counted = stats["samples"]
    partly = (f" (of {manifest.num_samples}: shards of an older prep not counted)"
              if counted != manifest.num_samples else "")
    lines = [f"contents     {counted} samples{partly}, {_duration(stats['seconds'])}; the crop cuts "
             f"{stats['crop_fraction']:.1%} of a frame on average; {stats['cropped_over_quarter']} lose more than "
             f"{shard_format.CROP_WARN:.0%}"]
    width = max(len(_bucket_name(b)) for b in stats["buckets"]) if stats["buckets"] else 0
    for bucket in stats["buckets"]:
        lines.append(f"  {_bucket_name(bucket):<{width}}  {bucket['samples']:>7} samples  "
                     f"{_duration(bucket['seconds']):>10}  crop {bucket['crop_fraction']:6.1%}  "
                     f"over {shard_format.CROP_WARN:.0%}: {bucket['cropped_over_quarter']}")
    return lines


def _bucket_name(bucket: dict[str, Any]) -> str:
    frames = bucket["frames"]
    return f"{frames} frame{'' if frames == 1 else 's'}, {bucket['height']}x{bucket['width']}"


def _duration(seconds: float) -> str:
    """Seconds as 12.3 s, 4m 05s or 2h 03m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def verify(out: str | Path) -> tuple[list[str], int]:
    """(problems, samples checked): checksums, sizes, and every sample decoded and checked against the manifest."""
    out = Path(out)
    manifest = Manifest.read(out)
    index = manifest.sample_index(Store(out))
    problems: list[str] = []
    checked = 0
    for shard_number, entry in enumerate(manifest.shards):
        path = out / entry.name
        if not path.is_file():
            problems.append(f"{entry.name}: missing")
            continue
        if path.stat().st_size != entry.bytes:
            problems.append(f"{entry.name}: {path.stat().st_size} bytes, manifest says {entry.bytes}")
        if shard_format.file_sha256(path) != entry.sha256:
            problems.append(f"{entry.name}: sha256 differs from the manifest")
        try:
            samples = list(_tar_samples(path))
        except (tarfile.TarError, OSError) as err:
            problems.append(f"{entry.name}: unreadable tar ({err})")
            continue
        keys = [s["__key__"] for s in samples]
        if keys != index.keys_of(shard_number):
            problems.append(f"{entry.name}: sample keys differ from the manifest's list")
        elif index.has_offsets(shard_number):
            recorded = index.members[index.shard_indices(shard_number).start:][:len(keys)].tolist()
            if shard_format.member_rows(path, keys) != recorded:
                problems.append(f"{entry.name}: member offsets differ from {shard_format.INDEX_NAME}")
        for sample, sample_number in zip(samples, index.shard_indices(shard_number)):
            digest = index.digest(sample_number)
            whole = shard_format.TENSORS_EXT in sample and shard_format.META_EXT in sample
            if digest and whole and shard_format.sample_digest(sample) != digest:
                problems.append(f"{entry.name}:{sample['__key__']}: sha256 differs from the manifest")
        if len(samples) != entry.samples:
            problems.append(f"{entry.name}: {len(samples)} samples, manifest says {entry.samples}")
        for sample in samples:
            checked += 1
            problems.extend(_sample_problems(f"{entry.name}:{sample['__key__']}", sample, manifest))
    listed = {e.name for e in manifest.shards}
    for path in sorted(out.glob("shard-*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: on disk but not in the manifest")
    return problems, checked


def _sample_problems(where: str, sample: dict[str, Any], manifest: Manifest) -> list[str]:
    """What is wrong with one sample read from a shard: members, decoding, bucket, shapes, dtypes, values."""
    problems = []
    extra = sorted(set(sample) - {"__key__", shard_format.TENSORS_EXT, shard_format.META_EXT})
    if extra:
        problems.append(f"{where}: unexpected members {extra}")
    try:
        tensors, meta = shard_format.decode_sample(sample)
    except Exception as err:  # any decode failure is a problem to report, not a crash
        return [*problems, f"{where}: does not decode ({first_line(err)})"]
    size = (meta.get("height", manifest.height), meta.get("width", manifest.width))
    if size not in set(manifest.sizes()):
        problems.append(f"{where}: size {size[0]}x{size[1]} is not one of the manifest's buckets")
    frames = meta.get("frames", manifest.frames)
    if frames not in manifest.all_frame_counts():
        problems.append(f"{where}: {frames} frames is not one of the manifest's frame counts")
    for name, shape in manifest.expected_shapes(*size, frames=frames).items():
        if name not in tensors:
            problems.append(f"{where}: no {name} tensor")
            continue
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            problems.append(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
        want = manifest.dtypes.get(name)
        if want and str(tensor.dtype).removeprefix("torch.") != want:
            problems.append(f"{where}: {name} is {tensor.dtype}, manifest says {want}")
        if not torch.isfinite(tensor.float()).all():
            problems.append(f"{where}: {name} has non-finite values")
    return problems


def _tar_samples(path: Path, only: str | None = None):
    """Samples of a tar as {__key__, ext: bytes} dicts, grouped by key in file order (no webdataset decoding); with
    `only`, members of that extension alone are read."""
    current: dict[str, Any] | None = None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            if only is None or ext == only:
                current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current
