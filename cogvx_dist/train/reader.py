"""The train-side reader: a deterministic global sample stream over local shards, sliced per rank.

The stream is the concatenation of per-epoch permutations of all samples (seeded by the run seed and the epoch).
Optimizer step s consumes stream positions [s*G, (s+1)*G) for a global batch of G samples; inside it, micro-step m
of data-parallel rank r reads the `micro_batch_size` positions starting at m*micro*dp + r*micro. So every rank
runs the same number of steps whatever the shard sizes, and a run resumes at any step, with any number of ranks,
from the stream position alone.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.shard_format import (
    IMAGE_TENSORS,
    MANIFEST_NAME,
    META_EXT,
    TENSORS_EXT,
    VIDEO_TENSORS,
    Manifest,
    decode_sample,
    sample_digest,
)


class BadSample(Exception):
    """A sample that cannot be trusted, named by shard and key."""

    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(f"shard {shard}, sample {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason


class ShardIndex:
    """Random access to every sample of a local dataset folder by global index (manifest order).

    With `verify` "size" or "sha256", every shard's size is compared with the manifest at start-up (the problems
    are in `damaged`); with "sha256" each sample's digest is checked as it is read. `read` raises BadSample for a
    sample that is missing, does not decode, fails its digest or holds non-finite values.
    """

    def __init__(self, folder: str | Path, manifest: Manifest | None = None, verify: str = "size") -> None:
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.read(self.folder)
        self.verify = verify
        self.entries: list[tuple[int, int]] = []
        """(shard number, position in the shard) of each global sample index."""
        self.damaged: dict[str, str] = {}
        """Shard name -> why its file does not match the manifest."""
        self._offsets: dict[int, dict[str, tuple[int, int]]] = {}
        for shard_number, shard in enumerate(self.manifest.shards):
            path = self.folder / shard.name
            if not path.is_file():
                raise CogvxError(f"data.shards: shard {path} listed in the manifest is missing")
            if len(shard.keys) != shard.samples:
                raise CogvxError(f"{self.folder / MANIFEST_NAME}: shard {shard.name} lists {len(shard.keys)} keys "
                                 f"for {shard.samples} samples")
            self.entries.extend((shard_number, i) for i in range(len(shard.keys)))
            size = path.stat().st_size
            if verify != "none" and size != shard.bytes:
                cut = self._cut_off(shard_number)
                self.damaged[shard.name] = f"{size} bytes, the manifest says {shard.bytes}{cut}"
        if not self.entries:
            raise CogvxError(f"data.shards: {self.folder} holds no samples")

    def __len__(self) -> int:
        return len(self.entries)

    def _cut_off(self, shard_number: int) -> str:
        """Which samples a damaged shard no longer holds whole, for the message."""
        members = self._members(shard_number)
        shard = self.manifest.shards[shard_number]
        size = (self.folder / shard.name).stat().st_size

        def whole(name: str) -> bool:
            return name in members and sum(members[name]) <= size  # offset + length within the file

        missing = [key for key in shard.keys if not (whole(f"{key}.{TENSORS_EXT}") and whole(f"{key}.{META_EXT}"))]
        if not missing:
            return " (replaced?)"
        return f" (truncated: {len(missing)} of its {len(shard.keys)} samples cut off, from {missing[0]})"

    def _members(self, shard_number: int) -> dict[str, tuple[int, int]]:
        """(offset, size) of each member of a shard; a truncated shard gives the members before the damage."""
        if shard_number not in self._offsets:
            members: dict[str, tuple[int, int]] = {}
            try:
                with tarfile.open(self.folder / self.manifest.shards[shard_number].name) as tar:
                    for member in tar:
                        if member.isfile():
                            members[member.name] = (member.offset_data, member.size)
            except (tarfile.TarError, OSError):
                pass  # the samples after the damage are missing; read() names them
            self._offsets[shard_number] = members
        return self._offsets[shard_number]

    def read(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata of global sample `index`; BadSample if it cannot be trusted."""
        shard_number, position = self.entries[index]
        shard = self.manifest.shards[shard_number]
        key = shard.keys[position]
        sample = self._raw(shard_number, key)
        if self.verify == "sha256" and shard.digests and sample_digest(sample) != shard.digests[position]:
            raise BadSample(shard.name, key, "sha256 differs from the manifest (damaged bytes)")
        try:
            tensors, meta = decode_sample(sample)
        except Exception as err:  # any decode failure of stored bytes is a bad sample, never a crash
            raise BadSample(shard.name, key, f"does not decode ({first_line(err)})") from err
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise BadSample(shard.name, key, f"{name} holds non-finite values")
        return tensors, meta

    def _raw(self, shard_number: int, key: str) -> dict[str, Any]:
        shard = self.manifest.shards[shard_number]
        members = self._members(shard_number)
        sample: dict[str, Any] = {"__key__": key}
        with open(self.folder / shard.name, "rb") as handle:
            for ext in (TENSORS_EXT, META_EXT):
                name = f"{key}.{ext}"
                if name not in members:
                    raise BadSample(shard.name, key, f"no {ext} member (the shard ends early or was rewritten)")
                offset, size = members[name]
                handle.seek(offset)
                sample[ext] = handle.read(size)
                if len(sample[ext]) != size:
                    raise BadSample(shard.name, key, f"{ext} member cut short (the shard ends early)")
        return sample

    def key(self, index: int) -> str:
        """Sample key of global index `index`."""
        shard_number, position = self.entries[index]
        return self.manifest.shards[shard_number].keys[position]

    def shard_of(self, index: int) -> str:
        """File name of the shard holding global index `index`."""
        return self.manifest.shards[self.entries[index][0]].name


class SampleStream:
    """Stream position -> sample index: per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def sample_at(self, position: int) -> int:
        """The sample index at a stream position."""
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=generator).tolist()
            self._epoch = epoch
        return self._perm[offset]


@dataclass(frozen=True)
class BatchPlan:
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

    def __init__(self, index: ShardIndex, plan: BatchPlan, seed: int, start_position: int, steps: int,
                 on_bad: str = "fail") -> None:
        self.index = index
        self.plan = plan
        self.stream = SampleStream(len(index), seed)
        self.start_position = start_position
        self.steps = steps
        self.on_bad = on_bad
        self._bad: dict[int, BadSample] = {}
        """Samples found bad once (they stay bad: no second read)."""

    def __len__(self) -> int:
        return self.steps * self.plan.grad_accum_steps

    def __getitem__(self, micro_index: int) -> dict[str, Any]:
        tensors, keys, bad = [], [], []
        for position in self.plan.positions(self.start_position, micro_index):
            try:
                index, sample = self._read_or_replace(self.stream.sample_at(position), bad)
            except BadSample as err:
                return {"failure": f"bad sample on rank {self.plan.dp_rank}: {err} (data.on_bad_sample: skip "
                                   "trains on without it)"}
            tensors.append(sample)
            keys.append(self.index.key(index))
        batch = collate(tensors, keys)
        batch["bad"] = bad
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
    for name in VIDEO_TENSORS + IMAGE_TENSORS:
        if name in tensors[0]:
            batch[name] = torch.stack([t[name] for t in tensors])
    return batch


def make_loader(dataset: Dataset, num_workers: int) -> DataLoader:
    """Loader over micro-batches in order; workers only prefetch, so the order does not depend on them."""
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
