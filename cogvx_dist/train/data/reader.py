"""The train-side reader: a deterministic global sample stream over local shards, sliced per rank.

The stream is the concatenation of per-epoch permutations of all samples (seeded by the run seed and the epoch).
Optimizer step s consumes stream positions [s*G, (s+1)*G) for a global batch of G samples; inside it, micro-step m
of data-parallel rank r reads the `micro_batch_size` positions starting at m*micro*dp + r*micro. So every rank
runs the same number of steps whatever the shard sizes, and a run resumes at any step, with any number of ranks,
from the stream position alone.

Seen in micro-batches, the stream is a sequence of batch units of `micro_batch_size` samples: rank r's micro-batch
at (step s, micro-step m) is unit k = s*accum*dp + m*dp + r (the positions above divided by micro_batch_size), so the
units of a step do not depend on how the step is split over ranks. A dataset whose samples come in several shapes
(resolution x frame count buckets) read with micro_batch_size > 1 needs every unit to be one bucket's; its units
come from BucketedStream instead (positions stay counted in samples: unit k starts at position k*micro_batch_size).
With one bucket, or micro_batch_size 1, the units are consecutive chunks of SampleStream, the order it always had.

With a token budget per micro-batch (train.micro_batch_tokens) a unit of bucket b holds
max(1, budget // tokens of one sample of b) samples, so small buckets are batched more; the units still come from
BucketedStream (with any number of buckets), and positions are counted in unit slots of micro_batch_size, so
BatchSplit and resumes work unchanged while the samples a step trains vary with its buckets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.families import get_family
from cogvx_dist.core.sample_index import UNKNOWN, member_row, tar_members
from cogvx_dist.core.shard_format import (
    LATENT_MEAN,
    MANIFEST_NAME,
    META_EXT,
    TENSORS_EXT,
    TRAINING_TENSORS,
    Manifest,
    decode_sample,
    read_empty_prompt,
    sample_digest,
)
from cogvx_dist.core.storage import Store


class BadSample(Exception):
    """A sample that cannot be trusted, named by shard and key."""

    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(f"shard {shard}, sample {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason


class ShardIndex:
    """Random access to every sample of a dataset by global index (manifest order), from a local folder or a URL
    prefix (core/storage.py): each sample is one ranged read at the offsets the sample index records (a version 1
    manifest's shards have their tar headers scanned once instead).

    With `verify` "size" or "sha256", every shard's size is compared with the manifest at start-up (one listing for
    an object store; the problems are in `damaged`); with "sha256" each sample's digest is checked as it is read.
    `read` raises BadSample for a sample that is missing, cannot be fetched, does not decode, fails its digest or
    holds non-finite values.
    """

    def __init__(self, folder: str | Path, manifest: Manifest | None = None, verify: str = "size",
                 storage_options: dict[str, Any] | None = None) -> None:
        self.store = Store(folder, storage_options)
        self.manifest = manifest or Manifest.read(folder, self.store)
        self.samples = self.manifest.sample_index(self.store)
        self.verify = verify
        self.damaged: dict[str, str] = {}
        """Shard location -> why its file does not match the manifest."""
        self.unshaped: dict[int, str] = {}
        """Global index -> why its shape could not be read (found by `buckets`; those samples are in no bucket)."""
        self._buckets: list[Bucket] | None = None
        shards = self.manifest.shards
        sizes = self.store.sizes([shard.name for shard in shards])
        for shard_number, shard in enumerate(shards):
            size = sizes[shard.name]
            if size is None:
                raise CogvxError(f"data.shards: shard {self.store.url(shard.name)} listed in the manifest is missing")
            listed = len(self.samples.shard_indices(shard_number))
            if listed != shard.samples:
                raise CogvxError(f"{self.store.url(MANIFEST_NAME)}: shard {shard.name} lists {listed} keys for "
                                 f"{shard.samples} samples")
            if verify != "none" and size != shard.bytes:
                cut = self._cut_off(shard_number, size)
                self.damaged[self.store.url(shard.name)] = f"{size} bytes, the manifest says {shard.bytes}{cut}"
        if not len(self.samples):
            raise CogvxError(f"data.shards: {self.store.location} holds no samples")

    def __len__(self) -> int:
        return len(self.samples)

    def _cut_off(self, shard_number: int, size: int) -> str:
        """Which samples a damaged shard no longer holds whole, for the message."""
        self._locate(shard_number)
        indices = self.samples.shard_indices(shard_number)
        rows = self.samples.members[indices.start:indices.stop]
        ends = torch.maximum(rows[:, 0] + rows[:, 1], rows[:, 2] + rows[:, 3])  # members in either order
        whole = (rows[:, 0] != UNKNOWN) & (rows[:, 2] != UNKNOWN) & (ends <= size)
        missing = [indices[i] for i in (~whole).nonzero().flatten().tolist()]
        if not missing:
            return " (replaced?)"
        return (f" (truncated: {len(missing)} of its {len(indices)} samples cut off, from "
                f"{self.samples.key(missing[0])})")

    def _locate(self, shard_number: int) -> None:
        """Make sure a shard's member offsets are known: scan its tar headers where the manifest recorded none (a
        damaged shard gives the members before the damage)."""
        if self.samples.has_offsets(shard_number):
            return
        name = self.manifest.shards[shard_number].name
        try:
            with self.store.open(name) as handle:
                members = tar_members(handle)
        except (CogvxError, OSError):
            members = {}
        keys = self.samples.keys_of(shard_number)
        self.samples.set_members(shard_number, [member_row(members, k, TENSORS_EXT, META_EXT) for k in keys])

    def read(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata of global sample `index`; BadSample if it cannot be trusted."""
        shard, key = self.shard_of(index), self.key(index)
        sample = self._raw(index)
        digest = self.samples.digest(index)
        if self.verify == "sha256" and digest and sample_digest(sample) != digest:
            raise BadSample(shard, key, "sha256 differs from the manifest (damaged, or replaced since prep)")
        try:
            tensors, meta = decode_sample(sample)
        except Exception as err:  # any decode failure of stored bytes is a bad sample, never a crash
            raise BadSample(shard, key, f"does not decode ({first_line(err)})") from err
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise BadSample(shard, key, f"{name} holds non-finite values")
        return tensors, meta

    def _raw(self, index: int) -> dict[str, Any]:
        """The sample's two members, fetched with one read spanning both (they are adjacent in the tar)."""
        shard, key = self.shard_of(index), self.key(index)
        self._locate(self.samples.shard_of(index))
        tensors_at, tensors_bytes, meta_at, meta_bytes = self.samples.member(index)
        for ext, at in ((TENSORS_EXT, tensors_at), (META_EXT, meta_at)):
            if at == UNKNOWN:
                raise BadSample(shard, key, f"no {ext} member (the shard ends early or was rewritten)")
        first, end = min(tensors_at, meta_at), max(tensors_at + tensors_bytes, meta_at + meta_bytes)
        try:
            span = self.store.read(shard, first, end - first)
        except CogvxError as err:
            raise BadSample(shard, key, f"cannot be fetched ({err})") from err
        sample: dict[str, Any] = {"__key__": key}
        for ext, at, size in ((TENSORS_EXT, tensors_at, tensors_bytes), (META_EXT, meta_at, meta_bytes)):
            sample[ext] = span[at - first:at - first + size]
            if len(sample[ext]) != size:
                raise BadSample(shard, key, f"{ext} member cut short (the shard ends early)")
        return sample

    def key(self, index: int) -> str:
        """Sample key of global index `index`."""
        return self.samples.key(index)

    def shard_of(self, index: int) -> str:
        """File name of the shard holding global index `index`."""
        return self.manifest.shards[self.samples.shard_of(index)].name

    def stream(self, seed: int, micro_batch_size: int = 1, micro_batch_tokens: int = 0
               ) -> SampleStream | BucketedStream:
        """The run's sample order over this dataset: with micro_batch_size > 1 and samples of several shapes, in
        units of one bucket each (BucketedStream); else SampleStream, whose order one-bucket datasets always had.
        With a token budget (`micro_batch_tokens` > 0) always in bucket units, each bucket's unit sized by it."""
        if micro_batch_tokens:
            return BucketedStream(self.buckets(), micro_batch_size, seed,
                                  budget_unit_sizes(self.buckets(), self.manifest.family, micro_batch_tokens))
        if micro_batch_size > 1 and listed_buckets(self.manifest) > 1:
            buckets = self.buckets()
            if len(buckets) > 1:
                return BucketedStream(buckets, micro_batch_size, seed)
        return SampleStream(len(self), seed)

    def buckets(self) -> list[Bucket]:
        """The samples grouped by shape (resolution x frame count), ordered by shape. The sample index records no
        shapes, so each sample's comes from its tensors member's safetensors header: one small read a sample, the
        JSON header only (no tensor data, nothing unpickled), once per process. A sample whose header cannot be read
        is in no bucket but in `unshaped`."""
        if self._buckets is None:
            shapes = self._read_shapes()
            names = bucket_names(self.manifest)
            known = shapes[:, 0] != UNKNOWN
            found = sorted({tuple(row) for row in shapes[known].tolist()})
            self._buckets = []
            for shape in found:
                members = (shapes == torch.tensor(shape)).all(dim=1).nonzero().flatten()
                name = names.get(shape, "latents " + "x".join(map(str, shape)))
                self._buckets.append(Bucket(shape, name, members))
        return self._buckets

    def _read_shapes(self) -> torch.Tensor:
        """int64 [N, 4]: each sample's latent_mean shape (UNKNOWN rows where it cannot be read, in `unshaped`)."""
        shapes = torch.full((len(self), 4), UNKNOWN, dtype=torch.long)

        def read_shard(shard_number: int) -> None:
            indices = self.samples.shard_indices(shard_number)
            if not len(indices):
                return
            self._locate(shard_number)
            name = self.manifest.shards[shard_number].name
            try:
                handle = self.store.open(name)
            except (CogvxError, OSError) as err:
                self.unshaped.update(dict.fromkeys(indices, f"its shard cannot be opened ({first_line(err)})"))
                return
            rows = self.samples.members[indices.start:indices.stop, :2].tolist()
            found = []
            parsed: dict[bytes, tuple[int, int, int, int]] = {}  # a bucket's samples share their header bytes
            with handle:
                for index, (at, size) in zip(indices, rows):
                    try:
                        if at == UNKNOWN:
                            raise ValueError(f"no {TENSORS_EXT} member (the shard ends early or was rewritten)")
                        found.append(latent_shape(handle, at, size, parsed))
                    except (ValueError, OSError, CogvxError) as err:
                        self.unshaped[index] = f"its shape cannot be read ({first_line(err)})"
                        found.append((UNKNOWN,) * 4)
            shapes[indices.start:indices.stop] = torch.tensor(found, dtype=torch.long)

        shard_numbers = range(len(self.manifest.shards))
        if self.store.remote:  # one request a sample: keep several in flight
            with ThreadPoolExecutor(max_workers=min(16, len(shard_numbers)) or 1) as pool:
                list(pool.map(read_shard, shard_numbers))
        else:
            for shard_number in shard_numbers:
                read_shard(shard_number)
        return shapes

    def empty_prompt(self) -> torch.Tensor:
        """The dataset's empty-prompt embedding (caption dropout)."""
        return read_empty_prompt(self.store)


TENSORS_HEAD_BYTES = 4096
"""What is read of a sample's tensors member to learn its shapes: the safetensors length word and JSON header (about
100 bytes a tensor; a longer header is read on), never the tensor data."""


def latent_shape(handle: Any, at: int, size: int,
                 parsed: dict[bytes, tuple[int, int, int, int]] | None = None) -> tuple[int, int, int, int]:
    """The latent_mean shape of the safetensors member of `size` bytes at offset `at` of an open shard, from its JSON
    header alone; ValueError when the header is not a readable one. `parsed` remembers headers already parsed."""
    handle.seek(at)
    head = handle.read(min(size, TENSORS_HEAD_BYTES))
    if len(head) < 8:
        raise ValueError("tensors member cut short (the shard ends early)")
    length = int.from_bytes(head[:8], "little")
    if length > size - 8:
        raise ValueError(f"safetensors header of {length} bytes in a member of {size}")
    if len(head) < 8 + length:
        head += handle.read(8 + length - len(head))
    header = head[8:8 + length]
    if parsed is not None and header in parsed:
        return parsed[header]
    try:
        shape = json.loads(header)[LATENT_MEAN]["shape"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"no readable {LATENT_MEAN} entry in its safetensors header ({first_line(err)})") from err
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise ValueError(f"{LATENT_MEAN} has shape {shape}, not [C, F, H, W]")
    if parsed is not None:
        parsed[header] = tuple(shape)  # type: ignore[assignment]
    return tuple(shape)  # type: ignore[return-value]


def listed_buckets(manifest: Manifest) -> int:
    """How many shapes the manifest says samples may have: resolutions x frame counts (an upper bound: the samples
    may fill fewer)."""
    return len(manifest.sizes()) * len(manifest.all_frame_counts())


def bucket_names(manifest: Manifest) -> dict[tuple[int, ...], str]:
    """latent_mean shape -> the bucket's name in pixels ("32x48, 9 frames"), for every bucket the manifest lists."""
    names: dict[tuple[int, ...], str] = {}
    for frames in manifest.all_frame_counts():
        for height, width in manifest.sizes():
            shape = tuple(manifest.expected_shapes(height, width, frames)[LATENT_MEAN])
            names.setdefault(shape, f"{height}x{width}, {frames} frame{'' if frames == 1 else 's'}")
    return names


def bucket_tokens(bucket: Bucket, family_name: str) -> int:
    """Transformer tokens of one sample of `bucket` (the clip its latent shape stands for)."""
    family = get_family(family_name)
    return family.tokens_per_sample(*family.clip_of_latents(*bucket.shape[1:]))


def samples_within_budget(tokens_per_sample: int, micro_batch_tokens: int) -> int:
    """Samples of this many tokens in one micro-batch under a token budget: as many as fit, at least one."""
    return max(1, micro_batch_tokens // tokens_per_sample)


def budget_unit_sizes(buckets: list[Bucket], family_name: str, micro_batch_tokens: int) -> list[int]:
    """Samples in one micro-batch of each bucket under a token budget (samples_within_budget)."""
    return [samples_within_budget(bucket_tokens(bucket, family_name), micro_batch_tokens) for bucket in buckets]


@dataclass(frozen=True)
class Bucket:
    """Samples that stack into one micro-batch: one resolution and frame count."""

    shape: tuple[int, ...]
    """The latent_mean shape [C, F_latent, H/8, W/8] its samples share (every other tensor's shape follows)."""
    name: str
    """Its name in messages: "32x48, 9 frames" (the latent shape where the manifest lists no such bucket)."""
    samples: torch.Tensor
    """int64 [n]: its samples' global indices, ascending."""


class Samples(Protocol):
    """What micro-batches read from: one dataset (ShardIndex) or a mixture of several (train/data/mixture.py)."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def key(self, index: int) -> str: ...

    def shard_of(self, index: int) -> str: ...

    def stream(self, seed: int, micro_batch_size: int = 1, micro_batch_tokens: int = 0) -> Any: ...


class SampleStream:
    """Stream position -> sample index: per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        """This epoch's permutation, as a tensor (8 bytes a sample; a list would take 36)."""

    def sample_at(self, position: int) -> int:
        """The sample index at a stream position."""
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        return int(self._perm[offset])


def _generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (its sha256, so no two tuples share a seed in practice)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class BucketedStream:
    """Batch unit -> its samples, every unit one bucket's: the order of micro_batch_size > 1 over several buckets.

    Epoch e: each bucket's samples in a permutation seeded by (seed, e, the bucket's shape), cut into units of
    micro_batch_size; then all the epoch's units in one permutation seeded by (seed, e), so the buckets come in
    proportion to their sizes, mixed. A bucket's last n % micro_batch_size samples of each epoch's permutation
    (fewer than a unit) are left out of that epoch, not carried on: every epoch then holds the same number of
    units, so unit k is in epoch k // units_per_epoch (position -> sample in O(1) from any resume point, on any
    rank), no unit holds a sample twice, and since each epoch draws afresh no sample is left out for good
    (`left_out` counts them). Unit k covers stream positions [k*micro_batch_size, (k+1)*micro_batch_size).

    `unit_sizes` (a token budget's, one per bucket) sizes each bucket's units instead of micro_batch_size; a unit
    still takes micro_batch_size positions (its slot), so positions, BatchSplit and resumes do not change, and the
    units are cut, counted and shuffled as above. Then buckets come in proportion to their units, not samples.
    """

    def __init__(self, buckets: list[Bucket], micro_batch_size: int, seed: int,
                 unit_sizes: list[int] | None = None) -> None:
        self.buckets = buckets
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.unit_sizes = list(unit_sizes) if unit_sizes is not None else [micro_batch_size] * len(buckets)
        """Samples in a unit of each bucket."""
        units = torch.tensor([len(bucket.samples) // size for bucket, size in zip(buckets, self.unit_sizes)])
        self.units_per_epoch = int(units.sum())
        """Units of every epoch (the buckets' whole units)."""
        if not self.units_per_epoch:
            what = (f"train.micro_batch_size {micro_batch_size}" if unit_sizes is None else
                    f"train.micro_batch_tokens (micro-batches of {', '.join(map(str, self.unit_sizes))})")
            raise CogvxError(f"{what}: no bucket holds a whole micro-batch")
        self.left_out = {bucket.name: len(bucket.samples) % size for bucket, size in zip(buckets, self.unit_sizes)}
        """Bucket name -> its samples left out of each epoch (a different draw each epoch)."""
        self._unit_bucket = torch.repeat_interleave(torch.arange(len(buckets)), units)
        """Bucket of each of an epoch's units before the shuffle (the buckets' units in bucket order)."""
        self._unit_number = torch.arange(self.units_per_epoch) - (units.cumsum(0) - units)[self._unit_bucket]
        """The unit's number within its bucket, in the same order."""
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)
        self._perms: dict[int, torch.Tensor] = {}
        """This epoch's permutation of each bucket drawn so far."""
        size = max(int(bucket.samples.max()) for bucket in buckets if len(bucket.samples)) + 1
        self._bucket_of = torch.full((size,), -1, dtype=torch.int32)
        """Global index -> bucket number (-1: in none), 4 bytes a sample."""
        for number, bucket in enumerate(buckets):
            self._bucket_of[bucket.samples] = number

    @property
    def left_out_per_epoch(self) -> int:
        """Samples in no unit of an epoch."""
        return sum(self.left_out.values())

    def _enter(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._order = torch.randperm(self.units_per_epoch, generator=_generator(self.seed, epoch))
            self._perms = {}
            self._epoch = epoch

    def _locate(self, unit: int) -> tuple[int, int]:
        """(bucket number, unit number within the bucket's permutation of its epoch) of unit `unit`."""
        epoch, offset = divmod(unit, self.units_per_epoch)
        self._enter(epoch)
        slot = int(self._order[offset])
        return int(self._unit_bucket[slot]), int(self._unit_number[slot])

    def bucket_at(self, unit: int) -> Bucket:
        """The bucket of unit `unit`."""
        return self.buckets[self._locate(unit)[0]]

    def unit(self, unit: int) -> list[int]:
        """The global sample indices of unit `unit`."""
        number, within = self._locate(unit)
        bucket = self.buckets[number]
        if number not in self._perms:
            self._perms[number] = torch.randperm(len(bucket.samples),
                                                 generator=_generator(self.seed, self._epoch, bucket.shape))
        size = self.unit_sizes[number]
        chosen = self._perms[number][within * size:(within + 1) * size]
        return bucket.samples[chosen].tolist()

    def sample_at(self, position: int) -> int:
        """The sample index at a stream position (IndexError past a token-budget unit's samples)."""
        unit, offset = divmod(position, self.micro_batch_size)
        return self.unit(unit)[offset]

    def same_bucket_from(self, index: int) -> Iterator[int]:
        """The samples of `index`'s bucket from it on, cyclically by global index: where a bad sample's stand-in is
        looked for, so the micro-batch stays one bucket's."""
        samples = self.buckets[int(self._bucket_of[index])].samples
        start = int(torch.searchsorted(samples, index))
        for attempt in range(len(samples)):
            yield int(samples[(start + attempt) % len(samples)])


@dataclass(frozen=True)
class BatchSplit:
    """Which stream positions a rank reads."""

    micro_batch_size: int
    grad_accum_steps: int
    dp_rank: int
    dp_size: int

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    def positions(self, start_position: int, micro_index: int) -> list[int]:
        """Stream positions of this rank's `micro_index`-th micro-batch counted from `start_position`."""
        step, micro_step = divmod(micro_index, self.grad_accum_steps)
        first = (
            start_position
            + step * self.global_batch
            + micro_step * self.micro_batch_size * self.dp_size
            + self.dp_rank * self.micro_batch_size
        )
        return list(range(first, first + self.micro_batch_size))

    def unit(self, start_position: int, micro_index: int) -> int:
        """The batch unit of this rank's `micro_index`-th micro-batch: step*accum*dp + micro_step*dp + rank counted
        from `start_position`'s unit. A start that is not a whole number of units (a resume under another
        micro_batch_size) goes on from the next whole unit."""
        return -(-self.positions(start_position, micro_index)[0] // self.micro_batch_size)


class MicroBatches(Dataset):
    """Map-style dataset: item j is this rank's j-th micro-batch after `start_position`, already collated.

    A bad sample (BadSample) with on_bad "skip" is replaced by the next readable sample of the dataset (by global
    index, so every run and every resume makes the same choice) and listed under "bad"; with "fail" the item holds
    only "failure", the one-line reason, for the training process to raise (an exception inside a loader worker
    would reach it wrapped in a traceback).
    """

    def __init__(self, index: Samples, split: BatchSplit, seed: int, start_position: int, steps: int,
                 on_bad: str = "fail", draws: Callable[[dict[str, Any], int], dict[str, torch.Tensor]] | None = None,
                 micro_batch_tokens: int = 0) -> None:
        self.index = index
        self.draws = draws
        """Draws item j's random numbers (train/step/loss.py's StepDraws), into the item's "randomness"."""
        self.split = split
        # A mixture's stream takes no budget (the config refuses one), so it is passed only when set.
        self.stream = (index.stream(seed, split.micro_batch_size, micro_batch_tokens) if micro_batch_tokens
                       else index.stream(seed, split.micro_batch_size))
        self.start_position = start_position
        self.steps = steps
        self.on_bad = on_bad
        self._bad: dict[int, BadSample] = {}
        """Samples found bad once (they stay bad: no second read)."""

    def __len__(self) -> int:
        return self.steps * self.split.grad_accum_steps

    def __getitem__(self, micro_index: int) -> dict[str, Any]:
        tensors, keys, bad = [], [], []
        for chosen in self.samples_of(micro_index):
            try:
                index, sample = self._read_or_replace(chosen, bad)
            except BadSample as err:
                return {"failure": f"bad sample on rank {self.split.dp_rank}: {err} (data.on_bad_sample: skip "
                                   "trains on without it)"}
            tensors.append(sample)
            keys.append(self.index.key(index))
        batch = collate(tensors, keys)
        batch["bad"] = bad
        if self.draws is not None:
            batch["randomness"] = self.draws(batch, micro_index)
        return batch

    def samples_of(self, micro_index: int) -> list[int]:
        """The global sample indices item `micro_index` reads (before bad ones are replaced)."""
        if isinstance(self.stream, BucketedStream):
            return self.stream.unit(self.split.unit(self.start_position, micro_index))
        return [self.stream.sample_at(p) for p in self.split.positions(self.start_position, micro_index)]

    def _candidates(self, index: int) -> Iterator[int]:
        """`index`, then the samples that may stand in for it: the next by global index, or in bucketed order the
        next of its bucket (so the micro-batch still stacks)."""
        if isinstance(self.stream, BucketedStream):
            yield from self.stream.same_bucket_from(index)
            return
        for attempt in range(len(self.index)):
            yield (index + attempt) % len(self.index)

    def _read_or_replace(self, index: int, bad: list[dict[str, str]]) -> tuple[int, dict[str, torch.Tensor]]:
        """(index, tensors) of `index`, or with on_bad "skip" of the first readable index after it (of its bucket,
        in bucketed order); the skipped samples are appended to `bad`."""
        for candidate in self._candidates(index):
            if candidate not in self._bad:
                try:
                    return candidate, self.index.read(candidate)[0]
                except BadSample as err:
                    self._bad[candidate] = err
            problem = self._bad[candidate]
            if self.on_bad != "skip":
                raise problem
            bad.append({"shard": problem.shard, "key": problem.key, "reason": problem.reason})
        where = "its bucket" if isinstance(self.stream, BucketedStream) else "the dataset"
        raise BadSample(self.index.shard_of(index), self.index.key(index), f"no readable sample in {where}")


def collate(tensors: list[dict[str, torch.Tensor]], keys: list[str]) -> dict[str, Any]:
    """Stack samples' tensors into a micro-batch (`keys` lists the sample keys, for traces)."""
    batch: dict[str, Any] = {"keys": keys}
    for name in TRAINING_TENSORS:
        if name in tensors[0]:
            batch[name] = torch.stack([t[name] for t in tensors])
    return batch


def make_loader(dataset: Dataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Loader over micro-batches in order; workers only prefetch, so the order does not depend on them. With
    `pin_memory` (GPU runs) batches arrive in page-locked memory, so their copies to the GPU do not block."""
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
