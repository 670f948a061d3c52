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

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.shard_format import (
    IMAGE_TENSORS,
    MANIFEST_NAME,
    META_EXT,
    TENSORS_EXT,
    VIDEO_TENSORS,
    Manifest,
    decode_sample,
)


class ShardIndex:
    """Random access to every sample of a local dataset folder by global index (manifest order)."""

    def __init__(self, folder: str | Path, manifest: Manifest | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.read(self.folder)
        self.entries: list[tuple[int, str]] = []
        for shard_number, shard in enumerate(self.manifest.shards):
            path = self.folder / shard.name
            if not path.is_file():
                raise CogvxError(f"data.shards: shard {path} listed in the manifest is missing")
            if len(shard.keys) != shard.samples:
                raise CogvxError(f"{self.folder / MANIFEST_NAME}: shard {shard.name} lists {len(shard.keys)} keys "
                                 f"for {shard.samples} samples")
            self.entries.extend((shard_number, key) for key in shard.keys)
        if not self.entries:
            raise CogvxError(f"data.shards: {self.folder} holds no samples")
        self._offsets: dict[int, dict[str, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _members(self, shard_number: int) -> dict[str, tuple[int, int]]:
        if shard_number not in self._offsets:
            path = self.folder / self.manifest.shards[shard_number].name
            with tarfile.open(path) as tar:
                self._offsets[shard_number] = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        return self._offsets[shard_number]

    def read(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata of global sample `index`."""
        shard_number, key = self.entries[index]
        members = self._members(shard_number)
        sample: dict[str, Any] = {"__key__": key}
        path = self.folder / self.manifest.shards[shard_number].name
        with open(path, "rb") as handle:
            for ext in (TENSORS_EXT, META_EXT):
                name = f"{key}.{ext}"
                if name not in members:
                    raise CogvxError(f"{path}: sample {key} has no {ext} member")
                offset, size = members[name]
                handle.seek(offset)
                sample[ext] = handle.read(size)
        return decode_sample(sample)

    def key(self, index: int) -> str:
        """Sample key of global index `index`."""
        return self.entries[index][1]


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
    """Map-style dataset: item j is this rank's j-th micro-batch after `start_position`, already collated."""

    def __init__(self, index: ShardIndex, plan: BatchPlan, seed: int, start_position: int, steps: int) -> None:
        self.index = index
        self.plan = plan
        self.stream = SampleStream(len(index), seed)
        self.start_position = start_position
        self.steps = steps

    def __len__(self) -> int:
        return self.steps * self.plan.grad_accum_steps

    def __getitem__(self, micro_index: int) -> dict[str, Any]:
        samples = [self.stream.sample_at(p) for p in self.plan.positions(self.start_position, micro_index)]
        return collate([self.index.read(s)[0] for s in samples], [self.index.key(s) for s in samples])


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
