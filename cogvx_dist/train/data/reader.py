"""The train-side reader: a deterministic global sample stream over local shards, sliced per rank.

The stream is the concatenation of per-epoch permutations of all samples (seeded by the run seed and the epoch).
Optimizer step s consumes stream positions [s*G, (s+1)*G) for a global batch of G samples; inside it, micro-step m
of data-parallel rank r reads the `micro_batch_size` positions starting at m*micro*dp + r*micro. So every rank
runs the same number of steps whatever the shard sizes, and a run resumes at any step, with any number of ranks,
from the stream position alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.sample_index import UNKNOWN, member_row, tar_members
from cogvx_dist.core.shard_format import (
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
            raise BadSample(shard, key, "sha256 differs from the manifest (damaged bytes)")
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

    def stream(self, seed: int) -> SampleStream:
        """The run's sample order over this dataset."""
        return SampleStream(len(self), seed)

    def empty_prompt(self) -> torch.Tensor:
        """The dataset's empty-prompt embedding (caption dropout)."""
        return read_empty_prompt(self.store)


class Samples(Protocol):
    """What micro-batches read from: one dataset (ShardIndex) or a mixture of several (train/data/mixture.py)."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def key(self, index: int) -> str: ...

    def shard_of(self, index: int) -> str: ...

    def stream(self, seed: int) -> Any: ...


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


class MicroBatches(Dataset):
    """Map-style dataset: item j is this rank's j-th micro-batch after `start_position`, already collated.

    A bad sample (BadSample) with on_bad "skip" is replaced by the next readable sample of the dataset (by global
    index, so every run and every resume makes the same choice) and listed under "bad"; with "fail" the item holds
    only "failure", the one-line reason, for the training process to raise (an exception inside a loader worker
    would reach it wrapped in a traceback).
    """

    def __init__(self, index: Samples, split: BatchSplit, seed: int, start_position: int, steps: int,
                 on_bad: str = "fail", draws: Callable[[dict[str, Any], int], dict[str, torch.Tensor]] | None = None
                 ) -> None:
        self.index = index
        self.draws = draws
        """Draws item j's random numbers (train/step/loss.py's StepDraws), into the item's "randomness"."""
        self.split = split
        self.stream = index.stream(seed)
        self.start_position = start_position
        self.steps = steps
        self.on_bad = on_bad
        self._bad: dict[int, BadSample] = {}
        """Samples found bad once (they stay bad: no second read)."""

    def __len__(self) -> int:
        return self.steps * self.split.grad_accum_steps

    def __getitem__(self, micro_index: int) -> dict[str, Any]:
        tensors, keys, bad = [], [], []
        for position in self.split.positions(self.start_position, micro_index):
            try:
                index, sample = self._read_or_replace(self.stream.sample_at(position), bad)
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

    def _read_or_replace(self, index: int, bad: list[dict[str, str]]) -> tuple[int, dict[str, torch.Tensor]]:
        """(index, tensors) of `index`, or with on_bad "skip" of the first readable index after it; the skipped
        samples are appended to `bad`."""
        for attempt in range(len(self.index)):
            candidate = (index + attempt) % len(self.index)
            if candidate not in self._bad:
                try:
                    return candidate, self.index.read(candidate)[0]
                except BadSample as err:
                    self._bad[candidate] = err
            problem = self._bad[candidate]
            if self.on_bad != "skip":
                raise problem
            bad.append({"shard": problem.shard, "key": problem.key, "reason": problem.reason})
        raise BadSample(self.index.shard_of(index), self.index.key(index), "no readable sample in the dataset")


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
