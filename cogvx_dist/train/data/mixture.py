"""Dataset mixtures (`data.sources`): several shard folders, each drawn with its weight, in one exact, resumable
sample stream.

The stream is cut into rounds of ROUND positions. Each round gives every source a fixed quota (its weight's share
of ROUND by largest remainder) and shuffles the round's slots with a generator seeded by (run seed, round), so
the mix holds exactly over every round and never drifts. A source's k-th slot overall reads position k of that
source's own stream (per-source epochs, as for one folder), so position -> sample is O(1) to compute on any rank,
at any resume point, for any number of ranks, and the samples seen per source up to any position are counted
without replaying the stream.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any

import torch

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.shard_format import Manifest
from cogvx_dist.train.data.reader import SampleStream, ShardIndex

ROUND = 1000
"""Stream positions per round of exact quotas."""


def quotas(weights: list[float], round_size: int = ROUND) -> list[int]:
    """Each source's slots per round: its share of `round_size` by largest remainder (ties to the earlier)."""
    total = sum(weights)
    shares = [w / total * round_size for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[:round_size - sum(counts)]:
        counts[i] += 1
    for i, count in enumerate(counts):
        if count == 0:
            raise CogvxError(f"data.sources[{i}].weight {weights[i]:g} is too small beside the others (under one "
                             f"sample in {round_size}); raise it or drop the source")
    return counts


class MixtureStream:
    """Stream position -> global sample index (sources concatenated in order), with exact quotas per round."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int) -> None:
        self.quotas = quotas(weights)
        self.offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        self.seed = seed
        self.streams = [SampleStream(size, seed * 1_000_003 + 7919 * (number + 1))
                        for number, size in enumerate(sizes)]
        self._round = -1
        self._slots = torch.empty(0, dtype=torch.long)
        """The round's source per slot."""
        self._occurrence = torch.empty(0, dtype=torch.long)
        """How many earlier slots of the round went to the same source."""

    def _enter(self, round_number: int) -> None:
        if round_number == self._round:
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 * (round_number + 1))
        slots = torch.repeat_interleave(torch.arange(len(self.quotas)), torch.tensor(self.quotas))
        self._slots = slots[torch.randperm(ROUND, generator=generator)]
        one_hot = torch.nn.functional.one_hot(self._slots, len(self.quotas))
        self._occurrence = (one_hot.cumsum(0) - one_hot).gather(1, self._slots.view(-1, 1)).flatten()
        self._round = round_number

    def source_at(self, position: int) -> tuple[int, int]:
        """(source number, position in that source's own stream) of a mixture stream position."""
        round_number, slot = divmod(position, ROUND)
        self._enter(round_number)
        source = int(self._slots[slot])
        return source, round_number * self.quotas[source] + int(self._occurrence[slot])

    def sample_at(self, position: int) -> int:
        source, local = self.source_at(position)
        return self.offsets[source] + self.streams[source].sample_at(local)

    def seen(self, positions: int) -> list[int]:
        """Samples each source supplied to stream positions [0, positions)."""
        round_number, slot = divmod(positions, ROUND)
        self._enter(round_number)
        partial = torch.bincount(self._slots[:slot], minlength=len(self.quotas)).tolist()
        return [round_number * quota + extra for quota, extra in zip(self.quotas, partial)]


def combined_manifest(manifests: list[Manifest]) -> Manifest:
    """One manifest standing for a mixture: every shard, resolution bucket and frame count (frame buckets, single
    images) of the sources, the longest clip as its frame count, the first source's header otherwise. Its stats
    are dropped: they count one source's samples, not the mixture's."""
    longest = max(manifests, key=lambda manifest: manifest.frames)
    sizes = dict.fromkeys(size for manifest in manifests for size in manifest.sizes())
    counts = sorted({count for manifest in manifests for count in manifest.all_frame_counts()}, reverse=True)
    return dataclasses.replace(manifests[0], shards=[shard for manifest in manifests for shard in manifest.shards],
                               frames=longest.frames, latent_frames=longest.latent_frames,
                               buckets=[list(size) for size in sizes], frame_counts=counts if len(counts) > 1 else [],
                               stats={})


class MixedIndex:
    """Several datasets read as one: global index = the sources' samples concatenated in order."""

    def __init__(self, sources: list[ShardIndex], names: list[str], weights: list[float]) -> None:
        self.sources = sources
        self.names = names
        self.weights = weights
        self.offsets = [0, *torch.tensor([len(s) for s in sources]).cumsum(0).tolist()]
        self.damaged = {url: why for source in sources for url, why in source.damaged.items()}

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[ShardIndex, int]:
        source = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[source], index - self.offsets[source]

    def read(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        source, local = self._locate(index)
        return source.read(local)

    def key(self, index: int) -> str:
        source, local = self._locate(index)
        return source.key(local)

    def shard_of(self, index: int) -> str:
        source, local = self._locate(index)
        return source.store.url(source.shard_of(local))

    def empty_prompt(self) -> torch.Tensor:
        """The first source's empty-prompt embedding (every source was encoded by the same text encoder)."""
        return self.sources[0].empty_prompt()

    def stream(self, seed: int, micro_batch_size: int = 1) -> MixtureStream:
        """The mixture's order. micro_batch_size does not change it: micro-batches of one bucket each are not made
        for mixtures yet, and the pre-flight refuses micro_batch_size > 1 where the sources hold several buckets."""
        return MixtureStream([len(s) for s in self.sources], self.weights, seed)

    def seen(self, positions: int, seed: int) -> dict[str, int]:
        """Metrics: samples drawn from each source up to a stream position of the run with this seed."""
        counts = self.stream(seed).seen(positions)
        return {f"samples_seen/{name}": count for name, count in zip(self.names, counts)}
