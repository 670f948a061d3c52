"""Shard writing (temporary name, then rename), per-rank progress files, resume, the final manifest merge, and the
inspect/verify checks. The folder layout is the shard format's (cogvx_dist/core/shard_format.py): a rank's
progress file is rewritten atomically after every shard and marked complete at the end of the rank's slice; the
rank's temporary shards and temporary progress files are deleted on resume.
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


class ShardWriter:
    """Writes one rank's samples into shards of bounded size; each shard appears under its final name only whole."""

    def __init__(self, out: Path, rank: int, next_index: int, max_bytes: int, max_samples: int,
                 on_shard: Callable[[ShardEntry], None]):
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
                self._keys, self._digests = [], []
            self._tar.write(sample)
            full = self._handle.tell() >= self.max_bytes
        except OSError as err:
            self._abandon(err)
        self._keys.append(key)
        self._digests.append(shard_format.sample_digest(sample))
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
        self.on_shard(entry)

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
    for path in sorted((out / PARTS_DIR).glob("errors-r*.jsonl")):
        for item in read_errors(path):
            if shard_format.sample_key(item["source"]) not in seen:
                errors[item["source"]] = item
    inputs = sum(parts[r].get("inputs", 0) for r in range(world))
    stats_keys = ("encoded", "failed", "truncated_prompts", "seconds", "decode_s", "decode_wait_s", "t5_s", "vae_s",
                  "write_s")
    totals = {k: round(sum(parts[r].get("stats", {}).get(k, 0) for r in range(world)), 3) for k in stats_keys}
    manifest = Manifest(
        **header,
        shards=shards,
        skipped=len(errors),
        extra={"inputs": inputs, "ranks": world, "totals_last_run": totals, "prep": parts[0].get("settings", {})},
    )
    with writing(out / shard_format.ERRORS_NAME):
        write_atomic(out / shard_format.ERRORS_NAME,
                     "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors.values()))
    with writing(out / shard_format.MANIFEST_NAME):  # the index, then the manifest
        manifest.write(out)
    return manifest, inputs


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
        f"video        {manifest.frames} frames, {manifest.height}x{manifest.width}, {manifest.fps:g} fps; buckets "
        + ", ".join(f"{h}x{w}" for h, w in buckets),
        f"latents      {manifest.latent_channels} channels, {manifest.latent_frames} frames; scaling factor "
        f"{manifest.vae_scaling_factor:g} ({manifest.latent_scaling}, invert_scale_latents="
        f"{manifest.invert_scale_latents})",
        f"text         {manifest.text_max_length} tokens x {manifest.text_embed_dim}",
        "dtypes       " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.dtypes.items())),
    ]
    if manifest.shards:
        first, last = manifest.shards[0].name, manifest.shards[-1].name
        lines.append(f"shards       {first} .. {last}")
    return "\n".join(lines)


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


def _tar_samples(path: Path):
    """Samples of a tar as {__key__, ext: bytes} dicts, grouped by key in file order (no webdataset decoding)."""
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
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current
